"""Which weights to drop, given scores: unstructured ratios and N:M groups.

Ties are broken deterministically: a stable sort puts equal scores in index order, and the lower
index is pruned first. The embedded model's 4-bit weights have many equal magnitudes, so this
matters for reproducibility.
"""

from __future__ import annotations

import torch


def prune_mask(scores: torch.Tensor, sparsity: float = 0.0, nm: tuple[int, int] | None = None,
               per_row: bool = True, chunk: int = 1 << 24) -> torch.Tensor:
    """Boolean mask, True where a weight is pruned (lowest scores first).

    * unstructured: `floor(sparsity * n)` lowest scores of each row (`per_row`) or of the whole matrix;
    * N:M: in every group of M consecutive inputs of a row, the M - N lowest scores.

    Row-wise choices are made `chunk` scores at a time: the sort's int64 indices of a whole 14336 × 4096
    matrix would take 470 MB, as much as the rest of an 8B block's pruning step.
    """
    rows, cols = scores.shape
    scores = scores.contiguous()  # a column-major weight's (GPT-2's Conv1D, held) would sort strided rows: 1.5x slower
    if nm is None and not per_row:
        flat = scores.reshape(1, -1)
        order = torch.argsort(flat, dim=-1, stable=True)[:, : int(flat.shape[1] * sparsity)]
        return torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, order, True).reshape(rows, cols)
    mask = torch.empty(rows, cols, dtype=torch.bool, device=scores.device)
    step = max(1, chunk // cols)
    for start in range(0, rows, step):
        mask[start:start + step] = _row_mask(scores[start:start + step], sparsity, nm)
    return mask


def _row_mask(scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None) -> torch.Tensor:
    rows, cols = scores.shape
    if nm is not None:
        n, m = nm
        groups = scores.reshape(rows, cols // m, m)
        order = torch.argsort(groups, dim=-1, stable=True)[..., : m - n]
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True).reshape(rows, cols)
    order = torch.argsort(scores, dim=-1, stable=True)[:, : int(cols * sparsity)]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, True)
