"""The one exception type users see: a clear, one-line message about their input."""


class PrunelabError(Exception):
    """Bad input or an unrecoverable condition, explained in one line."""


class MemoryBudgetWarning(UserWarning):
    """A run that will likely hold more memory than its budget (--max-memory); it goes on."""
