"""Where the matmuls of reconstruction and retraining run in bfloat16.

Autocast runs the matmul-like ops (linears, attention) in bfloat16 and leaves everything else as it
is: the weights (the optimiser's master copy), the residual stream, the targets and the losses stay
float32, because a half-block adds its bfloat16 branch output to a float32 residual. Casting the
activations themselves instead (an earlier attempt) rounded the targets and ruined them.

`auto` uses bfloat16 where the hardware multiplies in it natively: a GPU that supports it, or a CPU
with AMX or AVX-512 BF16 (a 512 × 576 × 1536 linear runs about 8× faster with AMX than in float32).
Elsewhere bfloat16 would be emulated and slower, so `auto` stays in float32 there.
"""

from __future__ import annotations

import contextlib
from itertools import chain
from typing import Callable

import torch
from torch import nn


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices in hardware."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private; absent in some builds
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    return False


def uses_bfloat16(precision: str, device: torch.device, auto_on_cpu: bool = True) -> bool:
    """`bfloat16`, or `auto` on hardware with native bfloat16 matmuls (`auto_on_cpu=False`: GPUs only)."""
    if precision == "auto" and device.type == "cpu" and not auto_on_cpu:
        return False
    return precision == "bfloat16" or (precision == "auto" and native_bfloat16(device))


def matmul_precision(bfloat16: bool) -> str:
    """The precision of the matmuls, as reports give it."""
    return "bfloat16" if bfloat16 else "float32"


def autocast(bfloat16: bool, device: torch.device):
    """Matmuls in bfloat16 if `bfloat16`; a no-op context otherwise.

    Autocast's weight cache is off: it keeps the first bfloat16 copy of every trainable weight for the
    whole region, so optimiser steps taken inside one region would train against stale weights."""
    if not bfloat16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)


def full_precision(device: torch.device):
    """Float32 inside an autocast region, for the pruning criteria (SparseGPT's cross-block update is a
    matmul). The input statistics need none: they accumulate in place (`addmm_`), which autocast leaves alone."""
    return torch.autocast(device.type, enabled=False)


@contextlib.contextmanager
def held_in_float32(*modules: nn.Module):
    """The modules' floating tensors in float32 for the while, each back to its own dtype after.

    What is trained is float32 whatever dtype the model is held in: AdamW's steps of 1e-5 would round away on
    bfloat16 weights, and the activation streams are float32. Each tensor goes back to its own dtype, not to
    the model's: a model loaded in bfloat16 keeps some in float32 (DeepSeek-V3's router, the modules a class
    lists in `_keep_in_fp32_modules`). Tensors are found again by name, so those a step replaced come back too."""
    def floating(module: nn.Module):
        return ((name, t) for name, t in chain(module.named_parameters(), module.named_buffers())
                if t.is_floating_point())

    held = [{name: t.dtype for name, t in floating(module)} for module in modules]
    for module in modules:
        module.to(torch.float32)
    try:
        yield
    finally:
        for module, dtypes in zip(modules, held):
            cast_each(module, dtypes.get)


@torch.no_grad()
def cast_each(module: nn.Module, dtype_of: Callable[[str], torch.dtype | None]) -> None:
    """Each floating parameter and buffer of `module` in the dtype `dtype_of(name)` says (None: as it is), in place:
    the Parameter objects stay those the model and its optimisers hold."""
    for name, tensor in chain(module.named_parameters(), module.named_buffers()):
        dtype = dtype_of(name)
        if tensor.is_floating_point() and dtype is not None and tensor.dtype != dtype:
            tensor.data = tensor.data.to(dtype)
