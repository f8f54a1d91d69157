"""Wanda: score_ij = |W_ij| · ‖X_j‖₂, compared within each output row (Sun et al., 2023)."""

from __future__ import annotations

import torch

from .patterns import prune_mask
from .stats import InputNorms


def wanda(
    weights: list[torch.Tensor], stats: InputNorms, sparsity: float, nm: tuple[int, int] | None, **_
) -> tuple[list[torch.Tensor], dict]:
    return [w.masked_fill(prune_mask(wanda_scores(w, stats), sparsity, nm, per_row=True), 0) for w in weights], {}


def wanda_scores(w: torch.Tensor, stats: InputNorms, **_) -> torch.Tensor:
    return w.float().abs() * stats.sq_norms.sqrt().to(w.device)
