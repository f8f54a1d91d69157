"""The sequential pruning pass, read top to bottom like the papers' procedure:

    capture the inputs of block 0
    for each decoder block, for its attention half then its MLP half,
        for each group of linears reading one input (q/k/v, o; gate/up, down), in the order the half runs them:
            run every calibration batch through the half up to the group's first linear and stop there,
            accumulating the statistics of that input (pad tokens excluded)
            prune the group with the criterion and the pattern
        the writer's inputs (o_proj, down_proj), kept from its statistics pass, give the half's outputs
        (residual stream), which are the next half's inputs

Later groups see the inputs of already-pruned groups ("true sequential", as in the SparseGPT
reference). Each pass stops at its group, so a half costs one forward pass plus its pre-norm once
more per group. Halves with routed experts take two passes: statistics of the unpruned half (routing
decides which expert linears a batch runs), then the pruned half's outputs.

Data-free criteria (magnitude) skip the calibration entirely.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import nullcontext
from fnmatch import fnmatchcase

import torch
from torch import nn
from tqdm.auto import tqdm

from ..activations import (
    Arena,
    BlockStream,
    agreed,
    capture_block_inputs,
    check_finite,
    check_finite_stats,
    collect_statistics,
    linear_inputs,
    propagate,
    share_inputs,
)
from ..config import RunConfig
from ..criteria import CRITERIA, magnitude
from ..errors import PrunelabError, PrunelabWarning
from ..measure import release_memory
from ..models.adapters import Adapter, Half
from ..models.loading import torch_dtype
from ..precision import full_precision
from ..resume import Checkpoints
from .layerwise import planned
from .permute import aligned, best_orders, reorder, unit_probe


def skipped(patterns: tuple[str, ...], name: str) -> bool:
    """Whether the linear with module name `name` is kept dense by the `skip` glob patterns."""
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def check_layers(adapter: Adapter, config: RunConfig) -> None:
    """Before any work: every `skip` pattern names a prunable linear and one is left to prune, and an N:M pattern
    divides the input size of every linear it prunes (a skipped one need not fit it)."""
    nm, patterns = config.nm, config.skip
    matched, pruned, example = set(), 0, None
    for i, block in enumerate(adapter.blocks):
        with adapter.prunable_linears(block) as linears:
            for name, linear in linears.items():
                full = f"{adapter.blocks_prefix}.{i}.{name}"
                example = example or full
                hits = {pattern for pattern in patterns if fnmatchcase(full, pattern)}
                matched |= hits
                if hits:
                    continue
                pruned += 1
                if nm is not None and linear.in_features % nm[1]:
                    raise PrunelabError(f"pattern {nm[0]}:{nm[1]} does not divide layer {i}.{name}: "
                                        f"{linear.in_features} inputs is not a multiple of {nm[1]}")
    unmatched = [pattern for pattern in patterns if pattern not in matched]
    if unmatched:
        raise PrunelabError(f"skip pattern {unmatched[0]!r} matches no prunable layer (module names such as "
                            f"{example!r})")
    if patterns and not pruned:
        raise PrunelabError(f"skip {list(patterns)} keeps every prunable layer dense: nothing is left to prune")
    reorderable = (c for block in adapter.blocks for c in adapter.channels(block).values())
    if config.permute and not any(aligned(c, nm[1]) for c in reorderable):
        warnings.warn(PrunelabWarning(f"permute: no layer of this {adapter.family} model has input channels that can "
                                      f"be reordered in groups of {nm[1]} (those of MLPs, experts and separate q/k/v "
                                      "attention): pruned without permutation"),
                      stacklevel=1)  # one place, so the second check of a job repeats nothing


def check_halves_cover(adapter: Adapter, index: int, halves, linears: dict[str, nn.Linear]) -> None:
    orphans = [n for n, m in linears.items() if not any(h.owns(m) for h in halves)]
    if orphans:
        raise PrunelabError(f"{adapter.family} adapter: block {index} has linears in neither half: {orphans}")


class HalfPruner:
    """Prunes half-blocks with the configured criterion and pattern; keeps one record per layer."""

    def __init__(self, config: RunConfig, prefix: str, adapter: Adapter | None = None):
        self.method, (self.stats_cls, self.criterion) = config.method, CRITERIA[config.method]
        self.skip, self.prefix = config.skip, prefix  # `skip` globs match f"{prefix}.{block}.{linear}"
        self.sparsity, self.nm = config.sparsity, config.nm
        self.adapter = adapter  # whose `channels` a permuting pruner reorders
        self.permute = config.permute
        self.reorders: dict[int, list[dict]] | None = None  # block -> its reorderings, where someone keeps them
        self.plan: list[dict] | None = None  # a sparsity per block (layerwise.planned); None: `sparsity` in all
        knobs = {"sparsegpt": config.sparsegpt, "ria": config.ria}.get(config.method)  # the criterion's own
        self.options = vars(knobs) if knobs is not None else {}
        self.records: list[dict] = []
        # The writer's inputs are kept from its statistics pass to give the half's outputs without another
        # forward pass; for a model larger than memory they are not (an 8B model's down_proj inputs for 128
        # windows of 512 tokens take 3.8 GB): the pruned half runs again instead, to the same values.
        self.keep_writer_inputs = True
        self.group_cache: dict[tuple[str, ...], dict[str, str]] = {}  # blocks of one structure share groups
        self.found: tuple[nn.Module, dict] | None = None  # (a block, its reorderable channels)

    def prune_group(self, index: int, linears: dict[str, nn.Linear], names: list[str], stats,
                    mirrors: dict[str, nn.Linear] | None = None, probe=None) -> torch.Tensor | None:
        """Prune the linears `names` (which read one input, described by `stats`) in place; `mirrors`
        (a lower-precision running copy) receive the same pruned weights. Returns the new order of the
        input channels where `permute` reordered them first (`probe()`: the half's branch output on a few
        windows, which the reordering must leave as it was), else None."""
        if stats is not None:
            stats.reduce()  # data parallel: the sums over every process's windows (distributed.py)
        dense = [name for name in names if skipped(self.skip, f"{self.prefix}.{index}.{name}")]
        self.records += [{"block": index, "layer": name, "shape": list(linears[name].weight.shape), "skipped": True}
                         for name in dense]
        names = [name for name in names if name not in dense]
        if not names:
            return None
        order, permuted = self._permute(index, linears, names, stats, mirrors, probe)
        weights = [linears[name].weight.data for name in names]
        sparsity = self.sparsity if self.plan is None else self.plan[index]["sparsity"]
        with full_precision(weights[0].device):  # inside reconstruction's autocast: SparseGPT's solves stay float32
            if self.stats_cls is not None and (stats is None or stats.tokens == 0):
                # No calibration token reached these layers (an expert never routed to, or only pad tokens).
                pruned, _ = magnitude(weights, None, sparsity, self.nm)
                info = {"fallback": "magnitude: no calibration tokens reached this layer"}
            else:
                pruned, info = self.criterion(weights, stats, sparsity, self.nm, **self.options)
        if self.plan is not None:
            info = {"target": sparsity, "outlier_share": self.plan[index]["outlier_share"], **info}
        for name, new_weight in zip(names, pruned):
            linears[name].weight.data.copy_(new_weight)
            if mirrors is not None:
                mirrors[name].weight.data.copy_(new_weight)
            self.records.append({"block": index, "layer": name, "shape": list(new_weight.shape),
                                 "tokens": 0 if stats is None else stats.tokens, **info, **permuted.get(name, {})})
        return order

    def _permute(self, index: int, linears: dict[str, nn.Linear], names: list[str], stats, mirrors,
                 probe) -> tuple[torch.Tensor | None, dict]:
        """Reorder the input channels of the writer among `names`, if it has any to reorder (prune/permute.py)."""
        if not self.permute or (self.stats_cls is not None and (stats is None or stats.tokens == 0)):
            return None, {}
        block = self.adapter.blocks[index]
        if self.found is None or self.found[0] is not block:  # a block with experts has many writers: ask once
            self.found = (block, self.adapter.channels(block))
        channels = next((self.found[1][name] for name in names if name in self.found[1]), None)
        if channels is None or not aligned(channels, self.nm[1]):
            return None, {}
        orders, kept = best_orders(channels, linears, stats, self.method, self.options, self.nm)
        probe = probe or unit_probe(channels, linears)
        before = probe() if probe is not None else None
        for target in (linears, mirrors) if mirrors is not None else (linears,):
            reorder(target, orders)
        if before is not None:
            error = float((probe() - before).float().norm() / before.float().norm().clamp_min(1e-30))
            exact = before.dtype == torch.float32 and not torch.is_autocast_enabled(before.device.type)
            if not error < (1e-4 if exact else 2e-2):  # summation order moves, in half precision by its rounding
                raise PrunelabError(f"permute: reordering the inputs of layer {index}.{channels.writer} changed what "
                                    f"it computes (relative difference {error:.2g}); the {self.adapter.family} "
                                    "adapter does not know this block's channels: run without --permute")
        order = orders[channels.writer][1]
        if stats is not None:
            stats.reorder(order)
        if self.reorders is not None:
            self.reorders.setdefault(index, []).append(orders)
        return order, {channels.writer: {"permuted": kept}}

    def groups(self, half: Half, members: dict[str, nn.Linear], stream: BlockStream, index: int) -> dict[str, str]:
        """{linear: the first linear of its group}, in the order the half runs them (cached per structure)."""
        key = tuple(members)
        if key not in self.group_cache:
            self.group_cache[key] = share_inputs(half, members, stream, index)
        return self.group_cache[key]

    def prune_half(self, index: int, half: Half, linears: dict[str, nn.Linear], stream: BlockStream,
                   need_output: bool, originals: dict[str, nn.Linear] | None = None) -> None:
        """Statistics from `stream` (the half's inputs), pruning, and, if needed, the half's outputs
        written over `stream`. `linears` are the ones the half runs; where the half runs on a copy,
        `originals` are the model's own linears, which are the ones pruned (in their own precision)."""
        members = {n: m for n, m in linears.items() if half.owns(m)}
        need_output = need_output and not half.deferred  # a parallel block's attention leaves the stream as it is

        def prune_group(names, stats, probe=None):
            if originals is None:
                return self.prune_group(index, linears, names, stats, probe=probe)
            return self.prune_group(index, originals, names, stats, mirrors=linears, probe=probe)

        if self.stats_cls is None:  # data-free: each linear alone
            for name in members:
                prune_group([name], None, self._probe(half, stream, index))
            if need_output:
                propagate(half, stream, index)
        elif half.writer is not None:
            self._prune_in_order(half, members, stream, index, prune_group, need_output)
        else:  # routing decides which experts run: all statistics first, then prune, then propagate
            stats, leader_of = agreed(*collect_statistics(half, members, stream, index, self.stats_cls), members,
                                      self.stats_cls)
            for leader in dict.fromkeys(leader_of.values()):
                prune_group([n for n in members if leader_of[n] == leader], stats.get(leader))
            if need_output:
                propagate(half, stream, index)

    def _probe(self, half: Half, stream: BlockStream, index: int):
        """The half's branch output on the stream's first batch, as a function (None unless permuting)."""
        if not self.permute:
            return None
        b, rows = next(stream.batches())

        @torch.no_grad()
        def probe() -> torch.Tensor:
            return half.run(stream.hidden[rows], stream.block_kwargs[index][b])
        return probe

    @torch.no_grad()
    def _prune_in_order(self, half: Half, members: dict[str, nn.Linear], stream: BlockStream, index: int,
                        prune_group, need_output: bool) -> None:
        """One statistics pass per group, each stopping at the group's first linear; the last group is
        the writer's, whose inputs are kept to compute the half's outputs once it is pruned."""
        leader_of = self.groups(half, members, stream, index)
        writer = next((n for n, m in members.items() if m is half.writer), None)
        if writer is None:
            raise PrunelabError(f"unsupported architecture: the output projection of block {index}'s {half.name} "
                                f"({type(half.writer).__name__}) is not a linear layer prunelab can prune")
        writer_inputs = order = None
        for leader in dict.fromkeys(leader_of.values()):
            linear = members[leader]
            stats = self.stats_cls(linear.in_features, linear.weight.device)
            keep = Arena() if leader == leader_of[writer] and need_output and self.keep_writer_inputs else None
            kept = linear_inputs(half, linear, stream, index, stats, keep)
            if keep is not None:
                writer_inputs = kept
            check_finite_stats({leader: stats}, index)
            reordered = prune_group([n for n in members if leader_of[n] == leader], stats,
                                    self._probe(half, stream, index))
            order = reordered if leader == leader_of[writer] else order
        if need_output and writer_inputs is None:
            propagate(half, stream, index)
        elif need_output:
            for b, rows in stream.batches():
                x = writer_inputs[rows] if order is None else writer_inputs[rows][..., order.to(writer_inputs.device)]
                stream.hidden[rows] = half.output(stream.hidden[rows], half.writer(x), stream.block_kwargs[index][b])
                check_finite(stream.hidden[rows], f"the {half.name} of block {index}")


def prune_model(model: nn.Module, adapter: Adapter, input_ids: torch.Tensor | None, config: RunConfig,
                attention_mask: torch.Tensor | None = None, progress: bool = True,
                checkpoints: Checkpoints | None = None, visits=None) -> list[dict]:
    """Prune `model` in place, block by block; returns one record per pruned layer. With `checkpoints`,
    progress is saved as it goes, and a run resumes from the newest checkpoint there. `visits` (a model
    larger than memory: streaming.py) brings each block in before it is pruned (`enter`), takes
    it out after (`leave`), and the embeddings while the windows are embedded (`embedding()`)."""
    pruner = HalfPruner(config, adapter.blocks_prefix, adapter)
    pruner.keep_writer_inputs = visits is None
    check_layers(adapter, config)
    pruner.plan = planned(model, adapter, input_ids, attention_mask, config, visits, progress)
    compute_dtype = torch_dtype(config.dtype)
    stream = None
    if pruner.stats_cls is not None:
        if input_ids is None:
            raise PrunelabError(f"{config.method} needs calibration data")
        with visits.embedding() if visits is not None else nullcontext():
            stream = capture_block_inputs(model, adapter.blocks, input_ids, attention_mask, config.forward_batch,
                                          compute_dtype)
    done, blocks = 0, len(adapter.blocks)
    if checkpoints is not None and checkpoints.latest_step() is not None:
        done, tensors, meta = checkpoints.load(adapter.blocks)
        pruner.records = meta["pruning"]
        if visits is not None:
            visits.resume(meta["streamed"])
        if stream is not None and done < blocks:
            stream.hidden.copy_(tensors["hidden"])

    for index, block in enumerate(tqdm(adapter.blocks[done:], desc=f"{config.method} {config.target_label}",
                                       unit="block", disable=not progress, initial=done, total=blocks), start=done):
        if visits is not None:
            visits.enter(index)
        # Forward passes may run in a cheaper dtype on a copy; the model's own weights stay put. The block's
        # dtype, not the model's: a streamed model's skeleton keeps the checkpoint's dtype on the meta device.
        block_dtype = next(block.parameters()).dtype
        runner = block if compute_dtype == block_dtype or stream is None else copy.deepcopy(block).to(compute_dtype)
        separate_runner = runner is not block
        with adapter.prunable_linears(block) as linears, \
                (adapter.prunable_linears(runner) if separate_runner else nullcontext(linears)) as run_linears:
            if stream is None:  # data-free
                for name in linears:
                    pruner.prune_group(index, linears, [name], None)
            else:
                halves = adapter.halves(runner)
                check_halves_cover(adapter, index, halves, run_linears)
                for part, half in enumerate(halves):
                    last = index + 1 == len(adapter.blocks) and part == 1
                    pruner.prune_half(index, half, run_linears, stream, need_output=not last,
                                      originals=linears if separate_runner else None)
        del runner, linears, run_linears  # per-expert linears are views: kept, they hold a streamed block
        if visits is not None:
            visits.leave(index)
        if checkpoints is not None:
            checkpoints.changed(index)
            if checkpoints.due(index + 1, blocks):
                hidden = {"hidden": stream.hidden} if stream is not None and index + 1 < blocks else {}
                streamed = {"streamed": visits.state()} if visits is not None else {}
                checkpoints.save(index + 1, adapter.blocks, hidden, {"pruning": pruner.records, **streamed})
        release_memory()  # freed activations would otherwise fragment the heap and inflate RSS block after block
    return pruner.records
