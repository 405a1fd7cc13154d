"""The one exception type a user is meant to see: a clear message and exit code 2, no traceback."""


class XferkitError(Exception):
    """A problem with the user's input or environment, explained in plain words."""

    exit_code = 2
