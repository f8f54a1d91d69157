"""The one exception type users see: a clear, one-line message about their input."""


class PrunelabError(Exception):
    """Bad input or an unrecoverable condition, explained in one line."""
