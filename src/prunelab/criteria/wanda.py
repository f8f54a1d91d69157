"""Wanda: score_ij = |W_ij| · ‖X_j‖₂, compared within each output row (Sun et al., 2023)."""

from __future__ import annotations

import torch

from .patterns import prune_mask
from .stats import InputNorms


def wanda(
    weights: list[torch.Tensor], stats: InputNorms, sparsity: float, nm: tuple[int, int] | None, **_
) -> tuple[list[torch.Tensor], dict]:
    input_norms = stats.sq_norms.sqrt()
    pruned = []
    for w in weights:
        scores = w.float().abs() * input_norms.to(w.device)
        pruned.append(w.masked_fill(prune_mask(scores, sparsity, nm, per_row=True), 0))
    return pruned, {}
