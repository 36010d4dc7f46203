"""The one exception type for mistakes the user can fix (bad flags, paths, combinations).

`main` turns it into a single `error: ...` line and exit code 2, before heavy work where
possible. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: the message says what is wrong and what to do."""


class RunFailure(Exception):
    """A run that cannot go on for a reason found while training (not the user's flags), e.g.
    non-finite losses: `main` prints one `error: ...` line and exits with `exit_code`."""

    exit_code = 3
