"""`python -m training.main ...` runs the same trainer as `python -m open_clip_train.main`."""
import sys

from open_clip_train.main import main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
