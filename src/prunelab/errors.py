"""The one exception type users see: a clear, one-line message about their input."""


class PrunelabError(Exception):
    """Bad input or an unrecoverable condition, explained in one line."""


class PrunelabWarning(UserWarning):
    """Something the user should know that does not stop the run, shown in one line like the errors."""


class MemoryBudgetWarning(PrunelabWarning):
    """A run that will likely hold more memory than its budget (--max-memory); it goes on."""
