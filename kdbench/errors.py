"""Errors that the CLI turns into one line and exit code 2 (bad input), never a traceback."""


class KdbenchError(Exception):
    """A user-facing error: what is wrong and what to do about it, in one line."""
