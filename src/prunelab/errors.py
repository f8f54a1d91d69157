"""The one exception type users see: a clear, one-line message about their input."""


class PrunelabError(Exception):
    """Bad input or an unrecoverable condition, explained in one line."""


class PrunelabWarning(UserWarning):
    """Something the user should know that does not stop the run, shown in one line like the errors."""


class MemoryBudgetWarning(PrunelabWarning):
    """A run that will likely hold more memory than its budget (--max-memory); it goes on."""


def quoted(name: str) -> str:
    """A name as a one-line message quotes it: whole where it is short, else its start and its length (a text
    passed where a file's name goes)."""
    if len(name) <= 120 and "\n" not in name:
        return repr(name)
    return f"{name[:40]!r}{'...' if len(name) > 40 else ''} ({len(name)} characters)"
