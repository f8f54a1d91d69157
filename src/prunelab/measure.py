"""Wall time and peak memory of each stage of a run."""

from __future__ import annotations

import ctypes
import gc
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TypedDict

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, Windows, musl): these tunings do not apply
        return None


def release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise, and it counts as resident)."""
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


@contextmanager
def large_allocations_mapped(threshold: int = 4 * 1024 * 1024):
    """Within: every allocation over `threshold` bytes gets its own memory mapping, unmapped when it is
    freed. Yields False where that cannot be set (not glibc).

    glibc starts with a 128 KiB threshold but raises it (up to 32 MB) each time a mapped block is freed, so
    that later tensors of up to 32 MB come from the heap, where freed ones leave holes that stay resident
    until `malloc_trim`. Fixing the threshold took 0.45 GB off the peak of an 8B model's streamed pruning at
    the same speed. The value: on the 8B model cut to 2 blocks, attn-mlp reconstruction (4 windows) took
    92 s at 128 KiB, 83 s at 1 MiB, 79 s at 4 MiB and 78 s with glibc's own raising, with peaks of 3.82,
    3.82, 3.84 and 4.07 GB: below 4 MiB the many mid-sized tensors of training are mapped and faulted in
    afresh each time (at 128 KiB the embedded model's reconstruction ran 1.8x slower), above it are the
    blocks' weights and activations that matter. Setting it turns the raising off for good, so on the way
    out it is left where the raising would have taken it (32 MB; trimming above 64 MB): the embedded
    model's reconstruction after it, in the same process, ran about 10 % slower than with glibc's default."""
    libc = _libc()
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
    mapped = bool(libc is not None and hasattr(libc, "mallopt") and libc.mallopt(M_MMAP_THRESHOLD, threshold))
    try:
        yield mapped
    finally:
        if mapped:
            libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)
            libc.mallopt(M_TRIM_THRESHOLD, 64 * 1024 * 1024)


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of resident memory (Linux); False where impossible."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process lifetime peak


class StageRecord(TypedDict, total=False):
    """What `stage` writes for each stage of a run (the report and the study read these keys)."""

    seconds: float
    peak_rss_gb: float
    peak_rss_scope: str  # "stage" (the high-water mark was reset at its start) or "process"
    cuda_peak_gb: float  # max CUDA memory allocated during the stage; only where CUDA is available


@contextmanager
def stage(name: str, log: dict[str, StageRecord]):
    """Record the wall time and peak memory of the enclosed block in log[name]."""
    per_stage = reset_peak_rss()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        yield
    finally:
        entry = StageRecord(seconds=round(time.perf_counter() - start, 2), peak_rss_gb=round(peak_rss_bytes() / 1e9, 3),
                            peak_rss_scope="stage" if per_stage else "process")
        if cuda:
            entry["cuda_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
        log[name] = entry


def python_argv(code: str) -> list[str]:
    """A Python command line running `code` with the current directory off `sys.path`: a file there named
    like a module prunelab imports (typer.py, torch.py) must not be executed in its place."""
    return [sys.executable, "-c", f"import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; {code}"]
