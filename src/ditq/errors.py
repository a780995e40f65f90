"""User-facing errors: one clear message naming the problem and the fix."""


class DitqError(Exception):
    """An error caused by bad input; the CLI prints its message without a traceback."""
