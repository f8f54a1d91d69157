"""GPT-2's `Conv1D` layers, held as `nn.Linear` while prunelab works on a model.

transformers' `Conv1D` (GPT-2, DistilGPT2, GPT-SW3) computes y = x W + b with W stored [in, out]: the transpose
of an `nn.Linear`'s [out, in] weight, which is what every criterion, mask, N:M group, reconstruction and LoRA layer
here reads. So a model is *held* with each Conv1D swapped for a `HeldConv1D`, an `nn.Linear` whose weight is the
transpose, and *released* back to Conv1D wherever it leaves prunelab: when it is saved (a checkpoint in any other
layout would not load, or, for a square matrix, would load silently wrong) and when the API hands it back. Both
compute the same product, x W + b = x (Wᵀ)ᵀ + b.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from transformers.pytorch_utils import Conv1D


class HeldConv1D(nn.Linear):
    """A transformers `Conv1D` held as an `nn.Linear` (weight [out, in]); `release` turns it back."""


def linear_class(module: nn.Module) -> type[nn.Linear]:
    """The class of a new linear that replaces `module` (narrower): a held Conv1D stays one, so that saving turns
    it back into the Conv1D its model's class builds; anything else becomes an `nn.Linear`."""
    return HeldConv1D if isinstance(module, HeldConv1D) else nn.Linear


def _as_linear(conv: Conv1D) -> HeldConv1D:
    linear = HeldConv1D(conv.nx, conv.nf, device="meta").train(conv.training)
    # A view of the stored [in, out] tensor, no copy: a held weight is column-major, so that holding and releasing
    # a model larger than half the memory costs nothing. Weights are written in place (copy_, mul_, masked_scatter_),
    # which lands in the view whatever its strides; `view` on it would fail loudly, not write elsewhere.
    linear.weight = nn.Parameter(conv.weight.data.t(), requires_grad=conv.weight.requires_grad)
    linear.bias = conv.bias
    return linear


def _as_conv1d(linear: HeldConv1D) -> Conv1D:
    conv = Conv1D.__new__(Conv1D)
    nn.Module.__init__(conv)
    conv.nf, conv.nx = linear.out_features, linear.in_features
    # the stored tensor again, contiguous, unless something gave the held weight new row-major storage
    conv.weight = nn.Parameter(linear.weight.data.t().contiguous(), requires_grad=linear.weight.requires_grad)
    conv.bias = linear.bias
    return conv.train(linear.training)


def _swap(model: nn.Module, kind: type, make) -> list[tuple[nn.Module, str, nn.Module]]:
    """Replace every `kind` child of `model` by `make(child)`; (parent, name, the child replaced) for each."""
    made, swapped = {}, []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is kind:
                if id(child) not in made:  # a module shared by two parents stays one module
                    made[id(child)] = make(child)
                setattr(parent, name, made[id(child)])
                swapped.append((parent, name, child))
    return swapped


def hold(model: nn.Module) -> int:
    """Swap every Conv1D of `model` for a `HeldConv1D`, in place; the number swapped (0 for most models)."""
    return len(_swap(model, Conv1D, _as_linear))


def release(model: nn.Module) -> int:
    """Swap every `HeldConv1D` of `model` back to the Conv1D its class builds, in place."""
    return len(_swap(model, HeldConv1D, _as_conv1d))


@contextmanager
def held(model: nn.Module) -> Iterator[nn.Module]:
    """`model` held for the duration, released after (for a model the caller owns: the API's)."""
    count = hold(model)
    try:
        yield model
    finally:
        if count:
            release(model)


@contextmanager
def released(model: nn.Module) -> Iterator[nn.Module]:
    """`model` as its class builds it for the duration (to save it); after, the very `HeldConv1D` modules it held,
    so that references to them and their weights stay valid."""
    swapped = _swap(model, HeldConv1D, _as_conv1d)
    try:
        yield model
    finally:
        for parent, name, original in swapped:
            setattr(parent, name, original)


def held_weights(model: nn.Module) -> set[str]:
    """State-dict names of the weights `model` holds transposed from how its checkpoint stores them."""
    return {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, HeldConv1D)}
