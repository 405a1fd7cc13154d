"""The exceptions a user is meant to see: a clear message and exit code 2, no traceback."""


class XferkitError(Exception):
    """A problem with the user's input or environment, explained in plain words."""

    exit_code = 2


class InvalidParameter(XferkitError, ValueError):
    """A hyper-parameter outside its range: a ``ValueError`` for scikit-learn, one line for the CLI."""
