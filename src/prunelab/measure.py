"""Wall time and peak memory of each stage of a run."""

from __future__ import annotations

import ctypes
import gc
import resource
import time
from contextlib import contextmanager
from pathlib import Path

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise, and it counts as resident)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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


@contextmanager
def stage(name: str, log: dict):
    """Record `seconds`, `peak_rss_gb` (and CUDA peak where used) of the enclosed block in log[name]."""
    per_stage = reset_peak_rss()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        yield
    finally:
        entry = {"seconds": round(time.perf_counter() - start, 2),
                 "peak_rss_gb": round(peak_rss_bytes() / 1e9, 3),
                 "peak_rss_scope": "stage" if per_stage else "process"}
        if cuda:
            entry["cuda_max_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
        log[name] = entry
