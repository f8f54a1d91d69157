"""Folders written all at once: built in a temporary sibling, renamed into place on success."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import PrunelabError


@contextmanager
def atomic_dir(final: Path, overwrite: bool = False):
    """Yield a temporary sibling of `final`; it replaces `final` only if the block succeeds.

    On any error the temporary folder is removed and `final` (if it existed) is untouched.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise PrunelabError(f"output folder already exists: {final} (choose another --out or pass --overwrite)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():  # overwrite: swap, then drop the old folder
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, trash / final.name)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
