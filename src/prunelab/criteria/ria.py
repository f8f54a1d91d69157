"""RIA, relative importance and activations (Zhang et al., ICLR 2024, "Plug-and-Play"):

    score_ij = ( |W_ij| / Σ_k |W_kj|  +  |W_ij| / Σ_k |W_ik| ) · ‖X_j‖₂^a

a weight's share of its input column plus its share of its output row, times the input norm to the
power a (0.5 in the paper). The relative terms keep a whole input channel or a whole output neuron
from being removed because its weights are all small. Compared over the whole matrix (the
reference's default; N:M: within each group). The reference divides ‖X_j‖² by the token count
first, a constant that no comparison within a matrix sees.
"""

from __future__ import annotations

import torch

from .patterns import prune_mask
from .stats import InputNorms


def ria(weights: list[torch.Tensor], stats: InputNorms, sparsity: float, nm: tuple[int, int] | None,
        alpha: float = 0.5, **_) -> tuple[list[torch.Tensor], dict]:
    return [w.masked_fill(prune_mask(ria_scores(w, stats, alpha), sparsity, nm, per_row=False), 0)
            for w in weights], {}


def ria_scores(w: torch.Tensor, stats: InputNorms, alpha: float = 0.5, **_) -> torch.Tensor:
    magnitude = w.float().abs()
    # a column or row of zeros scores 0 (not NaN): nothing in it to keep
    column_share = magnitude / magnitude.sum(0, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    row_share = magnitude / magnitude.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return (column_share + row_share) * (stats.sq_norms.sqrt() ** alpha).to(w.device)
