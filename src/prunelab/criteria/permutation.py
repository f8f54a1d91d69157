"""Channel permutation for N:M patterns (Zhang et al., ICLR 2024, "Plug-and-Play", §3.2).

An N:M pattern keeps N of every M *consecutive* inputs of a row. Which inputs sit next to each other is
arbitrary where the writer's input channels can be reordered together with the rows that produce them
(down_proj's inputs with gate/up's rows): a permutation then changes what the pattern may keep, not what
the model computes. With S the criterion's scores, laid out [rows, C] over C channels in C/M groups,

    find the partition of the channels into groups of M maximising  Σ_rows Σ_groups top_N(S[row, group])

in two steps, as in the reference:
  1. allocation: channels sorted by total score Σ_rows S, the r-th best to group r mod (C/M), so every
     group gets one of the C/M strongest channels, one of the next C/M, and so on;
  2. refinement, `rounds` times: take channel slot k (k = round mod M) out of every group and put the
     C/M channels back, one per group, by a linear assignment. With τ[row, g] the N-th largest score of
     the M − 1 channels group g keeps, channel c adds Σ_rows max(0, S[row, c] − τ[row, g]) to it; every
     other term is fixed, so the assignment maximising that gain is the best for this slot.

The gain matrix is computed as max(0, x) = (|x| + x) / 2, its |x| part as an L1 distance (`torch.cdist`,
p = 1), which never holds the [rows, C/M, C/M] differences: for an 8B down_proj on 2 CPU cores it takes 22 s
of a 28 s round, where broadcasting took 245 s.
"""

from __future__ import annotations

import torch


def retained(scores: torch.Tensor, n: int, m: int) -> float:
    """Σ of the scores an N:M pattern keeps over consecutive groups of `scores`' columns."""
    rows, cols = scores.shape
    return float(scores.reshape(rows, cols // m, m).topk(n, dim=-1).values.sum(dtype=torch.float64))


def gains(out: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """[channel, group] = Σ_rows max(0, out[row, channel] − tau[row, group])."""
    distance = torch.cdist(out.T.unsqueeze(0), tau.T.unsqueeze(0), p=1)[0]  # Σ_rows |out − tau|
    return (distance + out.sum(0)[:, None] - tau.sum(0)[None, :]) / 2


def channel_permutation(scores: torch.Tensor, n: int, m: int, rounds: int | None = None) -> torch.Tensor:
    """`order` such that `scores[:, order]` keeps at least as much under N:M as `scores` itself.

    `scores` [rows, C], C a multiple of M. `rounds` defaults to M (each slot refined once).
    """
    from scipy.optimize import linear_sum_assignment  # here: the GPU image runs everything else without scipy

    rows, channels = scores.shape
    if n >= m:  # every weight is kept, whatever the order
        return torch.arange(channels, device=scores.device)
    groups = channels // m
    scores = scores.float()
    by_total = scores.sum(0).argsort(descending=True, stable=True)
    slots = by_total.reshape(m, groups).T.contiguous()  # slots[g, k]: the k-th channel of group g
    for round_ in range(m if rounds is None else rounds):
        k = round_ % m
        out = slots[:, k]
        kept = slots[:, [j for j in range(m) if j != k]].reshape(-1)
        tau = scores[:, kept].reshape(rows, groups, m - 1).topk(n, dim=-1).values[..., -1]  # [rows, groups]
        gain = gains(scores[:, out], tau)
        channel, group = linear_sum_assignment(gain.double().cpu().numpy(), maximize=True)
        slots[torch.as_tensor(group, device=slots.device), k] = out[torch.as_tensor(channel, device=slots.device)]
    order = slots.reshape(-1)
    # the allocation may start below the identity, and the refinement never goes down: keep the better
    if retained(scores, n, m) >= retained(scores[:, order], n, m):
        return torch.arange(channels, device=scores.device)
    return order
