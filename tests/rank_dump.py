"""Moved to launch.py; kept while branches that import it are merged."""
from launch import DUMP_SCRIPT  # noqa: F401
