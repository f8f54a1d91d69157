"""Folders written all at once: built in a temporary sibling, renamed into place on success.

Every folder prunelab writes holds a `.prunelab` marker with the writer's process id. It marks the
folder as prunelab's, so that `--overwrite` never replaces anything else, and it tells whether a
leftover temporary sibling belongs to a process that died (kill -9, power cut) and can be removed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import PrunelabError

MARKER = ".prunelab"
RUN_FILES = ("prunelab.json",)  # folders written before the marker existed


def is_ours(folder: Path) -> bool:
    return (folder / MARKER).is_file() or any((folder / name).is_file() for name in RUN_FILES)


def check_output(final: Path, overwrite: bool) -> None:
    """Refuse an output folder before any work: one that exists (without `overwrite`), one that is not
    prunelab's to replace, the current directory or one holding it, or a place that cannot be written."""
    final = Path(final)
    if final.exists():
        if not final.is_dir():
            raise PrunelabError(f"output path exists and is not a folder: {final}")
        if not overwrite:
            raise PrunelabError(f"output folder already exists: {final} (choose another --out or pass --overwrite)")
        resolved, here = final.resolve(), Path.cwd().resolve()
        if resolved == here or resolved in here.parents:
            raise PrunelabError(f"cannot overwrite {final}: it is (or holds) the current directory")
        if any(final.iterdir()) and not is_ours(final):
            raise PrunelabError(f"refusing to overwrite {final}: it is not a prunelab output folder "
                                f"(no {MARKER} or prunelab.json in it)")
    parent = final.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise PrunelabError(f"cannot write the output folder {final}: {parent} is not a writable folder")
    try:  # permissions can say yes where the file system says no (read-only mounts, quotas)
        os.rmdir(tempfile.mkdtemp(prefix=".prunelab-probe-", dir=parent))
    except OSError as exc:
        raise PrunelabError(f"cannot write the output folder {final}: {parent}: {exc.strerror}") from None


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` says the device is full (safetensors reports it in its own exception type)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(exc) or "StorageFull" in str(exc)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


@contextmanager
def cache_lock(final: Path):
    """Held while the cache entry `final` is made: another process making the same entry waits here, and
    then finds it made (two test runs, or two jobs, starting together on a fresh machine)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def remove_stale_temporaries(final: Path) -> list[Path]:
    """Remove temporary siblings of `final` left by processes that no longer run; returns them."""
    removed = []
    for tmp in final.parent.glob(f".{final.name}.*-*"):
        if not (tmp.is_dir() and (".tmp-" in tmp.name or ".old-" in tmp.name)):
            continue
        try:
            pid = int((tmp / MARKER).read_text().strip())
        except (OSError, ValueError):
            continue  # not ours, or from a version without markers: left alone
        if not pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _new_temporary(final: Path, kind: str) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{kind}-", dir=final.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700: a shared result must be readable as any folder is
    (tmp / MARKER).write_text(str(os.getpid()))
    return tmp


def _readable(folder: Path) -> None:
    """Files as the umask would make them: safetensors 0.8 writes its files 0600, as a temporary file is,
    and a saved model is read by other users and tools."""
    umask = _umask()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(path.stat().st_mode | (0o666 & ~umask))


@contextmanager
def atomic_dir(final: Path, overwrite: bool = False):
    """Yield a temporary sibling of `final`; it replaces `final` only if the block succeeds.

    On any error the temporary folder is removed and `final` (if it existed) is untouched.
    """
    final = Path(final)
    check_output(final, overwrite)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(final)
        tmp = _new_temporary(final, "tmp")
    except OSError as exc:
        raise PrunelabError(f"cannot write the output folder {final}: {exc.strerror or exc}") from None
    try:
        try:
            yield tmp
        except Exception as exc:
            if disk_full(exc):
                raise PrunelabError(f"no space left on the device while writing {final}; "
                                    "nothing was replaced (free some space and run again)") from exc
            raise
        _readable(tmp)
        if final.exists():  # overwrite: swap, then drop the old folder
            trash = _new_temporary(final, "old")
            os.replace(final, trash / final.name)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
