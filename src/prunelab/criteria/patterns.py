"""Which weights to drop, given scores: unstructured ratios and N:M groups.

Ties are broken deterministically: a stable sort puts equal scores in index order, and the lower
index is pruned first. The embedded model's 4-bit weights have many equal magnitudes, so this
matters for reproducibility.
"""

from __future__ import annotations

import torch


def prune_mask(scores: torch.Tensor, sparsity: float = 0.0, nm: tuple[int, int] | None = None,
               per_row: bool = True) -> torch.Tensor:
    """Boolean mask, True where a weight is pruned (lowest scores first).

    * unstructured: `floor(sparsity * n)` lowest scores of each row (`per_row`) or of the whole matrix;
    * N:M: in every group of M consecutive inputs of a row, the M - N lowest scores.
    """
    rows, cols = scores.shape
    if nm is not None:
        n, m = nm
        groups = scores.reshape(rows, cols // m, m)
        order = torch.argsort(groups, dim=-1, stable=True)[..., : m - n]
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True).reshape(rows, cols)
    flat = scores if per_row else scores.reshape(1, -1)
    k = int(flat.shape[1] * sparsity)
    order = torch.argsort(flat, dim=-1, stable=True)[:, :k]
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, order, True).reshape(rows, cols)
