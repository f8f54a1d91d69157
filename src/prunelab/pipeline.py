"""The sequential pass, read top to bottom like the papers' procedure:

    capture the inputs of block 0
    for each decoder block, for its attention half then its MLP half,
        for each linear in the order the half runs them:
            accumulate the statistics of the linear's inputs (hooks, pad tokens excluded)
            prune it with the criterion and the pattern
            let it compute with its pruned weights, feeding the next linear
        the half's outputs (residual stream) are the next half's inputs

All calibration batches advance through a half in lockstep (`calibration.prune_half_in_lockstep`),
so a block costs one forward pass. Halves with routed experts take two: statistics of the
unpruned half, then the pruned half's outputs.

Data-free criteria (magnitude) skip the calibration entirely.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import capture_block_inputs, collect_statistics, propagate, prune_half_in_lockstep, share_inputs
from .config import RunConfig
from .errors import PrunelabError
from .models.adapters import Adapter
from .measure import release_memory
from .models.loading import torch_dtype
from .prune import CRITERIA, magnitude


def check_pattern_fits(adapter: Adapter, nm: tuple[int, int] | None) -> None:
    """N:M needs every pruned layer's input size to be a multiple of M: check before any work."""
    if nm is None:
        return
    for i, block in enumerate(adapter.blocks):
        with adapter.prunable_linears(block) as linears:
            for name, linear in linears.items():
                if linear.in_features % nm[1]:
                    raise PrunelabError(f"pattern {nm[0]}:{nm[1]} does not divide layer {i}.{name}: "
                                        f"{linear.in_features} inputs is not a multiple of {nm[1]}")


class HalfPruner:
    """Prunes half-blocks with the configured criterion and pattern; keeps one record per layer."""

    def __init__(self, config: RunConfig):
        self.stats_cls, self.criterion = CRITERIA[config.method]
        self.sparsity, self.nm = config.sparsity, config.nm
        self.options = vars(config.sparsegpt) if config.method == "sparsegpt" else {}
        self.records: list[dict] = []
        self.group_cache: dict[tuple[str, ...], dict[str, str]] = {}  # blocks of one structure share groups

    def prune_group(self, index: int, linears: dict[str, nn.Linear], names: list[str], stats,
                    mirrors: dict[str, nn.Linear] | None = None) -> None:
        """Prune the linears `names` (which read one input, described by `stats`) in place; `mirrors`
        (a lower-precision running copy) receive the same pruned weights."""
        weights = [linears[name].weight.data for name in names]
        if stats is None and self.stats_cls is not None:
            # No calibration token reached these layers (an expert never routed to).
            pruned, _ = magnitude(weights, None, self.sparsity, self.nm)
            info = {"fallback": "magnitude: no calibration tokens reached this layer"}
        else:
            pruned, info = self.criterion(weights, stats, self.sparsity, self.nm, **self.options)
        for name, new_weight in zip(names, pruned):
            linears[name].weight.data.copy_(new_weight)
            if mirrors is not None:
                mirrors[name].weight.data.copy_(new_weight)
            self.records.append({"block": index, "layer": name, "shape": list(new_weight.shape),
                                 "tokens": stats.tokens if stats is not None else 0, **info})

    def prune_half(self, index: int, half, linears: dict[str, nn.Linear], stream, need_output: bool,
                   originals: dict[str, nn.Linear] | None = None) -> None:
        """Statistics from `stream` (the half's inputs), pruning, and, if needed, the half's outputs
        written over `stream`. `linears` are the ones the half runs; where the half runs on a copy,
        `originals` are the model's own linears, which are the ones pruned (in their own precision)."""
        members = {n: m for n, m in linears.items() if half.owns(m)}

        def prune_group(names, stats):
            if originals is None:
                self.prune_group(index, linears, names, stats)
            else:
                self.prune_group(index, originals, names, stats, mirrors=linears)

        if self.stats_cls is None:  # data-free: each linear alone
            for name in members:
                prune_group([name], None)
            if need_output:
                propagate(half, stream, index)
        elif half.writer is not None:
            groups = self.group_cache.get(tuple(members)) or share_inputs(half, members, stream, index)
            self.group_cache[tuple(members)] = groups
            prune_half_in_lockstep(half, members, stream, index, self.stats_cls, groups, prune_group,
                                   need_output=need_output)
        else:  # routing decides which experts run: all statistics first, then prune, then propagate
            stats, leader_of = collect_statistics(half, members, stream, index, self.stats_cls)
            for leader in dict.fromkeys(leader_of.values()):
                prune_group([n for n in members if leader_of[n] == leader], stats.get(leader))
            if need_output:
                propagate(half, stream, index)


def check_halves_cover(adapter: Adapter, index: int, halves, linears: dict[str, nn.Linear]) -> None:
    orphans = [n for n, m in linears.items() if not any(h.owns(m) for h in halves)]
    if orphans:
        raise PrunelabError(f"{adapter.family} adapter: block {index} has linears in neither half: {orphans}")


def prune_model(model: nn.Module, adapter: Adapter, input_ids: torch.Tensor | None, config: RunConfig,
                attention_mask: torch.Tensor | None = None, progress: bool = True) -> list[dict]:
    """Prune `model` in place, block by block; returns one record per pruned layer."""
    pruner = HalfPruner(config)
    check_pattern_fits(adapter, config.nm)
    compute_dtype = torch_dtype(config.dtype)
    model_dtype = next(model.parameters()).dtype
    stream = None
    if pruner.stats_cls is not None:
        if input_ids is None:
            raise PrunelabError(f"{config.method} needs calibration data")
        stream = capture_block_inputs(model, adapter.blocks, input_ids, attention_mask, config.batch_size, compute_dtype)

    for index, block in enumerate(tqdm(adapter.blocks, desc=f"{config.method} {config.target_label}", unit="block",
                                       disable=not progress)):
        # Forward passes may run in a cheaper dtype on a copy; the model's own weights stay put.
        runner = block if compute_dtype == model_dtype or stream is None else copy.deepcopy(block).to(compute_dtype)
        separate_runner = runner is not block
        with adapter.prunable_linears(block) as linears, \
                (adapter.prunable_linears(runner) if separate_runner else nullcontext(linears)) as run_linears:
            if stream is None:  # data-free
                for name in linears:
                    pruner.prune_group(index, linears, [name], None)
                continue
            halves = adapter.halves(runner)
            check_halves_cover(adapter, index, halves, run_linears)
            for part, half in enumerate(halves):
                last = index + 1 == len(adapter.blocks) and part == 1
                pruner.prune_half(index, half, run_linears, stream, need_output=not last,
                                  originals=linears if separate_runner else None)
        del runner
        release_memory()  # freed activations would otherwise fragment the heap and inflate RSS block after block
    return pruner.records
