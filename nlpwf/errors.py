"""User errors: a mistake the user can fix, reported as one line without a traceback."""


class UserError(Exception):
    """Raised for bad input. The message names the problem and the fix."""

    exit_code = 2
