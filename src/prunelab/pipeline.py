"""The sequential pass, read top to bottom like the papers' procedure:

    capture the inputs of block 0
    for each decoder block:
        accumulate input statistics of its linears (hooks, pad tokens excluded)
        prune each linear with the criterion and the pattern
        propagate the pruned block's outputs: they are the next block's inputs

Data-free criteria (magnitude) skip the calibration entirely.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import capture_block_inputs, collect_statistics, propagate
from .config import RunConfig
from .errors import PrunelabError
from .models.adapters import Adapter
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


def prune_model(model: nn.Module, adapter: Adapter, input_ids: torch.Tensor | None, config: RunConfig,
                attention_mask: torch.Tensor | None = None, progress: bool = True) -> list[dict]:
    """Prune `model` in place, block by block; returns one record per pruned layer."""
    stats_cls, criterion = CRITERIA[config.method]
    nm = config.nm
    check_pattern_fits(adapter, nm)
    options = vars(config.sparsegpt) if config.method == "sparsegpt" else {}
    compute_dtype = torch_dtype(config.dtype)
    model_dtype = next(model.parameters()).dtype
    records: list[dict] = []
    stream = None
    if stats_cls is not None:
        if input_ids is None:
            raise PrunelabError(f"{config.method} needs calibration data")
        stream = capture_block_inputs(model, adapter.blocks, input_ids, attention_mask, config.batch_size, compute_dtype)

    for index, block in enumerate(tqdm(adapter.blocks, desc=f"{config.method} {config.target_label}", unit="block",
                                       disable=not progress)):
        # Forward passes may run in a cheaper dtype on a copy; the model's own weights stay put.
        runner = block if compute_dtype == model_dtype or stream is None else copy.deepcopy(block).to(compute_dtype)
        with adapter.prunable_linears(block) as linears, \
                (adapter.prunable_linears(runner) if runner is not block else nullcontext(linears)) as run_linears:
            if stream is None:
                stats, leader_of = {}, {name: name for name in linears}
            else:
                stats, leader_of = collect_statistics(runner, run_linears, stream, index, stats_cls)
            for leader in dict.fromkeys(leader_of.get(name, name) for name in linears):
                group = [name for name in linears if leader_of.get(name, name) == leader]
                weights = [linears[name].weight.data for name in group]
                if stream is not None and leader not in stats:
                    # No calibration token reached this layer (an expert never routed to): fall back.
                    pruned, info = magnitude(weights, None, config.sparsity, nm)
                    info = {"fallback": "magnitude: no calibration tokens reached this layer"}
                else:
                    pruned, info = criterion(weights, stats.get(leader), config.sparsity, nm, **options)
                for name, new_weight in zip(group, pruned):
                    linears[name].weight.data.copy_(new_weight)
                    if runner is not block:
                        run_linears[name].weight.data.copy_(new_weight)
                    tokens = stats[leader].tokens if leader in stats else 0
                    records.append({"block": index, "layer": name, "shape": list(new_weight.shape),
                                    "group": leader, "tokens": tokens, **info})
        if stream is not None and index + 1 < len(adapter.blocks):
            propagate(runner, stream, index, f"block {index}")
        del runner
    return records

