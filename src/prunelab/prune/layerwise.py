"""A sparsity per block: OWL, outlier-weighted layerwise sparsity (Yin et al., ICML 2024).

One pass of the calibration windows through the dense model, block by block, gives every block's
share of outliers among its Wanda scores, and from those the blocks' sparsities:

    A_ij = |W_ij| · rms_j(X)                     Wanda's score, over all of block ℓ's linears at once
    D_ℓ  = share of A in block ℓ above  outlier · mean(A)
    d_ℓ  = 2 · spread · (D_ℓ − min D) / (max D − min D)          in [0, 2 · spread]
    S_ℓ  = S + mean(d) − d_ℓ

Blocks with more outliers lose fewer weights. mean(d) is weighted by the blocks' prunable weights, so
the model as a whole loses the share S it was asked to (the reference averages over blocks, the same
where all blocks are alike). rms_j is the root mean square of input feature j over the tokens that
reached the linear: the reference's norm per window up to a constant of the block, and fair to experts
that few tokens reach.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from ..activations import BlockStream, agreed, capture_block_inputs, collect_statistics
from ..config import RunConfig
from ..criteria import InputNorms
from ..errors import PrunelabError
from ..measure import release_memory
from ..models.adapters import Adapter
from ..models.loading import torch_dtype


def planned(model, adapter: Adapter, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
            config: RunConfig, visits=None, progress: bool = True) -> list[dict] | None:
    """The blocks' sparsities as `config.layerwise` plans them; None where every block takes `config.sparsity`."""
    if config.layerwise == "uniform":
        return None
    if input_ids is None:
        raise PrunelabError(f"layerwise {config.layerwise} needs calibration data")
    return owl_sparsities(model, adapter, input_ids, attention_mask, config, visits, progress)


@torch.no_grad()
def owl_sparsities(model, adapter: Adapter, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   config: RunConfig, visits=None, progress: bool = True) -> list[dict]:
    """[{block, outlier_share, sparsity}] for every block (`visits`: a streamed model, see `prune_model`)."""
    dtype = torch_dtype(config.dtype)
    with visits.embedding() if visits is not None else nullcontext():
        stream = capture_block_inputs(model, adapter.blocks, input_ids, attention_mask, config.forward_batch, dtype)
    shares, sizes = [], []
    for index in tqdm(range(len(adapter.blocks)), desc="owl outliers", unit="block", disable=not progress):
        block = adapter.blocks[index] if visits is None else visits.streamed.load_block(index)
        share, size = outlier_share(adapter, index, block, stream, config.owl.outlier,
                                    last=index + 1 == len(adapter.blocks))
        if visits is not None:
            visits.streamed.drop_block(index)
        shares.append(share)
        sizes.append(size)
    del stream
    release_memory()
    sparsities = block_sparsities(shares, sizes, config.sparsity, config.owl.spread)
    return [{"block": i, "outlier_share": d, "sparsity": s} for i, (d, s) in enumerate(zip(shares, sparsities))]


def block_sparsities(shares: list[float], sizes: list[int], sparsity: float, spread: float) -> list[float]:
    """OWL's map from outlier shares D to block sparsities, keeping the weighted mean at `sparsity`."""
    D = torch.tensor(shares, dtype=torch.float64)
    weights = torch.tensor(sizes, dtype=torch.float64)
    span = D.max() - D.min()
    d = (D - D.min()) / span * 2 * spread if span > 0 else torch.zeros_like(D)  # all alike: uniform
    result = sparsity + (d * weights).sum() / weights.sum() - d
    if result.min() < 0 or result.max() >= 1:
        raise PrunelabError(f"layerwise owl: block sparsities from {result.min():.3f} to {result.max():.3f} leave "
                            f"[0, 1) at sparsity {sparsity} (the outliers are lopsided); use a smaller owl.spread")
    return result.tolist()


def outlier_share(adapter: Adapter, index: int, block, stream: BlockStream, outlier: float,
                  last: bool) -> tuple[float, int]:
    """(share of the block's Wanda scores above `outlier` × their mean, the number of scores); the stream
    moves on to the dense block's outputs."""
    dtype = stream.hidden.dtype
    runner = block if next(block.parameters()).dtype == dtype else copy.deepcopy(block).to(dtype)
    scored = []  # (weight, rms of its input features)
    with adapter.prunable_linears(block) as linears, \
            (adapter.prunable_linears(runner) if runner is not block else nullcontext(linears)) as run_linears:
        for part, half in enumerate(adapter.halves(runner)):
            members = {n: m for n, m in run_linears.items() if half.owns(m)}
            moves_on = not (last and part == 1)
            stats, leader_of = agreed(*collect_statistics(half, members, stream, index, InputNorms, moves_on),
                                      members, InputNorms)
            for leader in dict.fromkeys(leader_of.values()):
                if leader in stats:
                    stats[leader].reduce()  # data parallel: every process's windows
            for name in members:
                s = stats.get(leader_of[name])
                rms = (s.sq_norms / s.tokens).sqrt() if s is not None and s.tokens else None
                scored.append((linears[name].weight, rms))
        size = sum(w.numel() for w, _ in scored)
        total = sum(_scores(w, rms).sum(dtype=torch.float64) for w, rms in scored)
        threshold = outlier * total / size
        above = sum(int((_scores(w, rms) > threshold).sum()) for w, rms in scored)
    return above / size, size


def _scores(weight: torch.Tensor, rms: torch.Tensor | None) -> torch.Tensor:
    """|W| · rms(X); a linear no token reached scores 0, as its statistics do."""
    if rms is None:
        return torch.zeros_like(weight, dtype=torch.float32)
    return weight.float().abs() * rms.to(weight.device)

