"""SparseGPT (Frantar & Alistarh, 2023): mask selection with the optimal-brain-surgeon update.

Column by column, a weight w_j is pruned by score w²/[H⁻¹]²_jj and the error it leaves,
err = w_j / [H⁻¹]_jj, is pushed onto the not-yet-processed columns: W[:, k] -= err · U_jk with U the
upper Cholesky factor of H⁻¹. Layers that read the same input (q/k/v, gate/up) share one Hessian,
so they are solved together; each keeps its own mask budget.
"""

from __future__ import annotations

import torch

from ..errors import PrunelabError
from .patterns import prune_mask
from .stats import Hessian

MAX_DAMP_RETRIES = 6


def inverse_cholesky(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = damp · mean(diag H).

    A failed factorisation multiplies damp by 10 and retries; returns (U, damp used, retries).
    """
    mean_diag = hessian.diagonal().mean()
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for retry in range(MAX_DAMP_RETRIES + 1):
        lower, info = torch.linalg.cholesky_ex(hessian + damp * mean_diag * eye)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info == 0 and torch.isfinite(upper).all():
                return upper, damp, retry
        damp = damp * 10 if damp > 0 else 0.01
    raise PrunelabError(f"Cholesky of the Hessian failed even with damping {damp / 10:g}; "
                        "the calibration activations are degenerate (NaN/inf or all zero)")


def sparsegpt(weights: list[torch.Tensor], stats: Hessian, sparsity: float, nm: tuple[int, int] | None,
              damp: float = 0.01, blocksize: int = 128) -> tuple[list[torch.Tensor], dict]:
    W = torch.cat([w.float() for w in weights])  # rows of all layers that share this input
    bounds = torch.tensor([0] + [w.shape[0] for w in weights]).cumsum(0).tolist()
    segments = list(zip(bounds[:-1], bounds[1:]))
    cols = W.shape[1]
    if damp not in stats.solved:
        H = stats.matrix
        dead = H.diagonal() == 0  # inputs that never fire: their weights cannot matter
        H[dead, dead] = 1
        stats.solved[damp] = (dead, *inverse_cholesky(H, damp))
    dead, Hinv, damp_used, retries = stats.solved[damp]
    dead, Hinv = dead.to(W.device), Hinv.to(W.device)
    W[:, dead] = 0
    if nm is not None:  # N:M groups must not straddle column blocks
        blocksize = max(nm[1], blocksize // nm[1] * nm[1])

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        d = Hinv1.diagonal()
        Err1 = torch.zeros_like(W1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if nm is None:  # each layer loses `sparsity` of this block, chosen across its rows
            scores = W1**2 / d**2
            for r0, r1 in segments:
                mask1[r0:r1] = prune_mask(scores[r0:r1], sparsity, per_row=False)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                m = nm[1]
                mask1[:, i:i + m] = prune_mask(W1[:, i:i + m] ** 2 / d[i:i + m] ** 2, nm=nm)
            w = W1[:, i]
            err = torch.where(mask1[:, i], w, 0.0) / d[i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)  # OBS update of later columns
            W1[:, i].masked_fill_(mask1[:, i], 0)
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    pruned = [W[r0:r1].to(w.dtype) for (r0, r1), w in zip(segments, weights)]
    return pruned, {"damp": damp_used, "damp_retries": retries, "dead_inputs": int(dead.sum())}
