"""The one exception type for mistakes the user can fix (bad flags, paths, combinations).

`main` turns it into a single `error: ...` line and exit code 2, before heavy work where
possible. Anything else is a bug and keeps its traceback.

Library messages name a setting by its config name through `flag("lock_image")`; the command
line (params.py) registers how it spells each one ("--lock-image"), so the library never
hard-codes a CLI spelling and reads naturally when used from code ("lock_image").
"""
from __future__ import annotations

from typing import Mapping

_SPELLING: dict[str, str] = {}


def register_flags(spelling: Mapping[str, str]) -> None:
    """How the front end spells each setting (argparse dest -> option string)."""
    _SPELLING.update(spelling)


def flag(name: str) -> str:
    """The user's spelling of setting `name` (an argparse dest), or `name` itself."""
    return _SPELLING.get(name, name)


class UserError(Exception):
    """A problem with the user's input: the message says what is wrong and what to do."""


class RunFailure(Exception):
    """A run that cannot go on for a reason found while training (not the user's flags), e.g.
    non-finite losses: `main` prints one `error: ...` line and exits with `exit_code`."""

    exit_code = 3
