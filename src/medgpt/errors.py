"""One exception class for everything a user can cause (bad input, bad flags, missing files)."""


class UserError(Exception):
    """An error caused by user input; the CLI prints its message on one line and exits non-zero."""
