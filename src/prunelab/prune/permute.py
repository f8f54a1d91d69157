"""Channel permutation (`permute`) in the sequential pass: just before a half's writer is pruned to an N:M
pattern, its reorderable input channels (the adapter's `Channels`) are put in the order that lets the
pattern keep the most of the criterion's score (criteria/permutation.py), in the writer's columns, the
producers' rows and the writer's input statistics alike. The model computes what it did; only the
positions of its weights change, so the saved checkpoint is an ordinary one, 2:4 in the stored layout.
"""

from __future__ import annotations

import torch
from torch import nn

from ..criteria import SALIENCY
from ..criteria.permutation import channel_permutation, retained
from ..models.adapters import Channels


def permuted_index(index: torch.Tensor, perms: torch.Tensor, size: int) -> torch.Tensor:
    """The full order of `size` rows or columns: position index[p, j, c] takes what was at index[p, j, perms[p, c]]."""
    order = torch.arange(size)
    order[index.reshape(-1)] = index.gather(2, perms[:, None, :].expand_as(index)).reshape(-1)
    return order


def aligned(channels: Channels, m: int) -> bool:
    """Whether every N:M group of the writer lies within one pool (so reordering a pool moves whole groups)."""
    return channels.columns.shape[-1] % m == 0 and bool((channels.columns[..., 0] % m == 0).all())


@torch.no_grad()
def reorder(linears: dict[str, nn.Linear], orders: dict[str, tuple[int, torch.Tensor]]) -> None:
    """Reorder, in place, each linear's rows (dim 0, with its bias) or columns (dim 1)."""
    for name, (dim, order) in orders.items():
        linear = linears[name]
        order = order.to(linear.weight.device)
        linear.weight.copy_(linear.weight.index_select(dim, order))
        if dim == 0 and linear.bias is not None:
            linear.bias.copy_(linear.bias[order])


def best_orders(channels: Channels, linears: dict[str, nn.Linear], stats, method: str, options: dict,
                nm: tuple[int, int]) -> tuple[dict[str, tuple[int, torch.Tensor]], dict]:
    """({linear: (dim, order)}, {share of the pooled scores N:M keeps before and after}) for one writer."""
    n, m = nm
    writer = linears[channels.writer].weight
    scores = SALIENCY[method](writer.data, stats, **options)
    pools, copies, width = channels.columns.shape
    perms, before, after, total = [], 0.0, 0.0, 0.0
    for p in range(pools):
        pool = scores[:, channels.columns[p].reshape(-1).to(scores.device)]
        pool = pool.reshape(-1, copies, width).reshape(-1, width)  # [rows × copies, channels]
        perm = channel_permutation(pool, n, m)
        perms.append(perm.cpu())
        before, after = before + retained(pool, n, m), after + retained(pool[:, perm], n, m)
        total += float(pool.sum(dtype=torch.float64))
    perms = torch.stack(perms)
    orders = {channels.writer: (1, permuted_index(channels.columns, perms, writer.shape[1]))}
    orders.update({name: (0, permuted_index(rows, perms, linears[name].weight.shape[0]))
                   for name, rows in channels.rows.items()})
    total = total or 1.0
    return orders, {"kept_before": round(before / total, 6), "kept_after": round(after / total, 6)}


def unit_probe(channels: Channels, linears: dict[str, nn.Linear]):
    """What the channels' unit (an MLP, an expert) computes on a few random inputs, as a function (None without a
    unit): a reordering that leaves it as it was is right for any input, routed to the expert or not."""
    if channels.unit is None:
        return None
    producer = linears[next(iter(channels.rows))].weight
    x = torch.randn(8, producer.shape[1], generator=torch.Generator().manual_seed(0))
    x = x.to(producer.device, producer.dtype)

    @torch.no_grad()
    def probe() -> torch.Tensor:
        return channels.unit(x)
    return probe
