"""Magnitude pruning: score = |W|, the smallest weights of the whole matrix go (N:M: of each group)."""

from __future__ import annotations

import torch

from .patterns import prune_mask


def magnitude(
    weights: list[torch.Tensor], stats: None, sparsity: float, nm: tuple[int, int] | None, **_
) -> tuple[list[torch.Tensor], dict]:
    pruned = [w.masked_fill(prune_mask(w.abs(), sparsity, nm, per_row=False), 0) for w in weights]
    return pruned, {}
