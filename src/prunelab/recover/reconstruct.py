"""Prune and reconstruct in one sequential pass, one submodel at a time:

    capture the inputs of block 0 (training and held-out calibration windows)
    for each submodel (a half-block, K blocks, or the whole stack; `matrix` trains each linear
    of a half-block on its own):
        keep a dense copy of its blocks
        targets = the dense submodel's outputs            (on which inputs: see propagation.py)
        prune it: its half-blocks in order, statistics from its inputs (prune/sequential.py)
        train its remaining weights to match the targets (AdamW, pruning mask kept exact)
        propagate: its outputs are the next submodel's inputs

Resident besides the model: the dense copy of the current submodel (until its targets are computed,
except for `matrix`), its optimiser state, and per window set (training, held-out) its inputs, targets
and one working copy (plus the dense activations in `mixed`), optionally in memory-mapped files.
"""

from __future__ import annotations

import copy
import time
from contextlib import ExitStack, nullcontext
from typing import Callable, Collection

import psutil
import torch
from torch import nn
from tqdm.auto import tqdm

from ..activations import Arena, capture_block_inputs, linear_inputs, run_halves
from ..config import RunConfig
from ..errors import PrunelabError
from ..measure import release_memory
from ..models.adapters import Adapter, Half
from ..precision import autocast, held_in_float32, matmul_precision, uses_bfloat16
from ..prune.layerwise import planned
from ..prune.permute import reorder
from ..prune.sequential import HalfPruner, check_halves_cover, check_layers
from ..resume import Checkpoints
from .loop import Trainable
from .propagation import Propagation
from .step import SPLITS, LinearProblem, SubmodelProblem, Trainer, stream_loss, trainable_parameters

Unit = tuple[int, int]  # (block index, 0 = attention half / 1 = MLP half)


def submodels(blocks: int, config: RunConfig, parallel: Collection[int] = ()) -> list[list[Unit]]:
    """The half-blocks of each submodel, in model order; together they cover every half once. Under attn-mlp,
    the halves of a `parallel` block (attention and MLP side by side: nothing between them to match) are
    one submodel."""
    units = [(i, part) for i in range(blocks) for part in (0, 1)]
    size = config.reconstruct.halves_per_submodel or len(units)
    plan = [units[start:start + size] for start in range(0, len(units), size)]
    if config.reconstruct.granularity == "attn-mlp":
        plan = [[(i, 0), (i, 1)] if i in parallel else [(i, part)] for [(i, part)] in plan
                if i not in parallel or part == 0]
    return plan


def parallel_blocks(adapter: Adapter) -> set[int]:
    return {i for i, block in enumerate(adapter.blocks) if adapter.halves(block)[0].deferred}


def submodel_name(units: list[Unit]) -> str:
    if len(units) == 1:
        return f"block {units[0][0]} {'attention' if units[0][1] == 0 else 'mlp'}"
    first, last = units[0][0], units[-1][0]
    return f"block {first}" if first == last else f"blocks {first}-{last}"


def choose_offload(config: RunConfig, train_windows: int, held_windows: int, hidden: int,
                   device: torch.device) -> bool:
    """`auto`: on disk when the cached activations would take more than half of the free memory."""
    rc = config.reconstruct
    if rc.offload == "on" and device.type != "cpu":
        raise PrunelabError("reconstruct.offload keeps activations in memory-mapped files of CPU runs; "
                            f"this run computes on {device}")
    if rc.offload != "auto":
        return rc.offload == "on"
    copies = 4 if Propagation(rc.propagation).separate_dense else 3
    size = copies * (train_windows + held_windows) * config.seqlen * hidden * 4  # float32
    return device.type == "cpu" and size > 0.5 * psutil.virtual_memory().available


def check_matrix_granularity(adapter: Adapter) -> None:
    for i, block in enumerate(adapter.blocks):
        for half in adapter.halves(block):
            if half.writer is None:
                raise PrunelabError(f"matrix reconstruction needs linears that every token runs; block {i}'s "
                                    f"{half.name} routes tokens to experts (use attn-mlp or coarser)")


class Reconstructor:
    """The sequential prune-and-reconstruct pass over a model."""

    def __init__(self, model: nn.Module, adapter: Adapter, config: RunConfig, progress: bool = True,
                 observer: Callable[[dict], None] | None = None, checkpoints: Checkpoints | None = None,
                 visits=None):
        self.model, self.adapter, self.config, self.rc = model, adapter, config, config.reconstruct
        self.progress, self.observer, self.checkpoints, self.visits = progress, observer, checkpoints, visits
        self.propagation = Propagation(self.rc.propagation)
        self.pruner = HalfPruner(config, adapter.blocks_prefix, adapter)
        self.pruner.keep_writer_inputs = visits is None
        if self.rc.granularity == "matrix":
            self.pruner.reorders = {}  # its dense copies are reordered as the pruned blocks were
        self.trainer = Trainer(config)
        self.trainer.spill_snapshots = visits is not None
        self.records: list[dict] = []
        self.seconds = {"targets": 0.0, "prune": 0.0, "train": 0.0, "propagate": 0.0}

    def run(self, input_ids: torch.Tensor, heldout_ids: torch.Tensor,
            attention_mask: torch.Tensor | None = None) -> dict:
        check_layers(self.adapter, self.config)
        if self.rc.granularity == "matrix":
            check_matrix_granularity(self.adapter)
        self.pruner.plan = planned(self.model, self.adapter, input_ids, attention_mask, self.config, self.visits,
                                   self.progress)
        self.model.requires_grad_(False)  # only the current submodel's parameters get gradients
        blocks, batch = self.adapter.blocks, self.config.forward_batch
        with self.visits.embedding() if self.visits is not None else nullcontext():
            capture = {
                "train": capture_block_inputs(self.model, blocks, input_ids, attention_mask, batch, torch.float32),
                "heldout": capture_block_inputs(self.model, blocks, heldout_ids, None, batch, torch.float32),
            }
        device = capture["train"].hidden.device
        offload = choose_offload(self.config, input_ids.shape[0], heldout_ids.shape[0],
                                 capture["train"].hidden.shape[-1], device)
        self.arena = Arena(offload)
        self.streams = {s: c.with_hidden(self.arena.clone(c.hidden) if offload else c.hidden)
                        for s, c in capture.items()}
        del capture
        pruned = {s: self.streams[s].hidden for s in SPLITS}  # what the current submodel's pruned model sees
        dense = None  # the dense model's activations there
        if self.propagation.keeps_dense:
            dense = {s: self.arena.clone(pruned[s]) for s in SPLITS} if self.propagation.separate_dense else pruned

        plan = submodels(len(blocks), self.config, parallel_blocks(self.adapter))
        done = 0
        if self.checkpoints is not None and self.checkpoints.latest_step() is not None:
            done, pruned, dense = self._resume(pruned, dense, len(plan))
        bfloat16 = uses_bfloat16(self.rc.precision, device)
        desc = f"{self.config.method} {self.config.target_label} + {self.rc.granularity} reconstruction"
        for step, units in enumerate(tqdm(plan[done:], desc=desc, unit="submodel", disable=not self.progress,
                                          initial=done, total=len(plan)), start=done + 1):
            with autocast(bfloat16, device):  # every pass of the submodel: targets, pruning, training, outputs
                pruned, dense = self._submodel(units, pruned, dense)
            self.streams = {s: self.streams[s].with_hidden(pruned[s]) for s in SPLITS}  # drop the old activations
            self._checkpoint(step, len(plan), units, pruned, dense)
            release_memory()
        return {"submodels": self.records, "lr": self.trainer.lr.summary(),
                "seconds": {k: round(v, 2) for k, v in self.seconds.items()}, "offload": offload,
                "precision": matmul_precision(bfloat16),
                "problems": self.trainer.problems, **({"resumed_after": done} if done else {})}

    def _checkpoint(self, step: int, steps: int, units: list[Unit], pruned: dict, dense: dict | None) -> None:
        """After `step` submodels: the blocks they changed and what the next one reads (resume.py)."""
        if self.checkpoints is None:
            return
        self.checkpoints.changed(*{i for i, _ in units})
        if self.visits is not None and self.visits.inside:
            return  # streamed: checkpoints are taken between blocks, when every changed weight is in a shard
        if not self.checkpoints.due(step, steps):
            return
        tensors = {} if step == steps else {f"pruned.{s}": pruned[s] for s in SPLITS}
        if step < steps and self.propagation.separate_dense:
            tensors.update({f"dense.{s}": dense[s] for s in SPLITS})
        meta = {"records": self.records, "pruning": self.pruner.records, "seconds": self.seconds,
                "trainer": self.trainer.state()}
        if self.visits is not None:
            meta["streamed"] = self.visits.state()
        self.checkpoints.save(step, self.adapter.blocks, tensors, meta)

    def _resume(self, pruned: dict, dense: dict | None, steps: int) -> tuple[int, dict, dict | None]:
        """The newest checkpoint's weights, records and activations in place of the first steps' work."""
        done, tensors, meta = self.checkpoints.load(self.adapter.blocks)
        self.records, self.pruner.records, self.seconds = meta["records"], meta["pruning"], meta["seconds"]
        self.trainer.load_state(meta["trainer"])
        if self.visits is not None:
            self.visits.resume(meta["streamed"])
        if done == steps:
            return done, pruned, dense
        device = pruned["train"].device
        pruned = {s: self.arena.clone(tensors[f"pruned.{s}"].to(device)) for s in SPLITS}
        if self.propagation.separate_dense:
            dense = {s: self.arena.clone(tensors[f"dense.{s}"].to(device)) for s in SPLITS}
        elif self.propagation.keeps_dense:
            dense = pruned
        self.streams = {s: self.streams[s].with_hidden(pruned[s]) for s in SPLITS}
        return done, pruned, dense

    def _stream(self, split: str, hidden: torch.Tensor):
        return self.streams[split].with_hidden(hidden)

    def _submodel(self, units: list[Unit], pruned: dict, dense: dict | None):
        """Targets, pruning, training and propagation of one submodel; returns the next (pruned, dense)."""
        blocks, adapter = self.adapter.blocks, self.adapter
        indices = sorted({i for i, _ in units})
        unit_blocks = [i for i, _ in units]
        name = submodel_name(units)
        if self.visits is not None:  # a streamed model: the submodel's blocks come in when it starts
            for i in indices:
                if (i, 0) in units:
                    self.visits.enter(i)
        started = tick = time.perf_counter()
        record: dict = {"submodel": name, "blocks": indices, "halves": [list(u) for u in units]}

        def lap(phase: str) -> None:
            nonlocal tick
            now = time.perf_counter()
            self.seconds[phase] += now - tick
            tick = now

        inputs = self.propagation.inputs(pruned, dense)
        # the blocks back in their dtypes only once the fused experts are back (the ExitStack, inner, exits first):
        # the per-expert views stand in for them until then
        with held_in_float32(*(blocks[i] for i in indices)), ExitStack() as stack:
            dense_blocks = {i: copy.deepcopy(blocks[i]) for i in indices}
            dense_halves = [adapter.halves(dense_blocks[i])[p] for i, p in units]
            sources = self.propagation.target_inputs(pruned, dense)
            targets = {s: run_halves(dense_halves, unit_blocks, self._stream(s, sources[s]), self._empty(inputs[s]),
                                     name) for s in SPLITS}
            if self.rc.granularity != "matrix":  # only `matrix` reads the dense copy again: free it before training
                dense_blocks = dense_halves = None
            lap("targets")

            linears = {i: stack.enter_context(adapter.prunable_linears(blocks[i])) for i in indices}
            halves = [adapter.halves(blocks[i])[p] for i, p in units]
            scale = self.trainer.channel_scale(targets["train"], self.streams["train"])
            work, before = self._prune(units, halves, linears, inputs, targets, scale)
            self._reorder_dense(dense_blocks)
            lap("prune")

            problem = SubmodelProblem(halves, unit_blocks, {s: self._stream(s, inputs[s]) for s in SPLITS}, targets,
                                      scale)
            self._train(problem, record, units, linears, dense_blocks, dense_halves, inputs, dense, before)
            lap("train")

            out = self.trainer.outputs(problem, record, name, work)
            if self.observer is not None:
                self.observer({"units": units, "inputs": inputs["train"], "targets": targets["train"],
                               "outputs": out["train"], "record": record})
        lap("propagate")

        record["seconds"] = round(time.perf_counter() - started, 2)
        self.records.append(record)
        if self.visits is not None:  # ... and go out once their last half is done
            for i in indices:
                if (i, 1) in units:
                    self.visits.leave(i)
        return self.propagation.advance(out, targets)

    def _reorder_dense(self, dense_blocks: dict[int, nn.Module] | None) -> None:
        """`matrix` compares linear by linear with the dense copy: it takes the channel orders `permute` gave."""
        for i, reorderings in (self.pruner.reorders or {}).items():
            with self.adapter.prunable_linears(dense_blocks[i]) as dense_linears:
                for orders in reorderings:
                    reorder(dense_linears, orders)
        if self.pruner.reorders:
            self.pruner.reorders.clear()

    def _train(self, problem, record, units, linears, dense_blocks, dense_halves, inputs, dense, before) -> None:
        """Train the pruned submodel (`matrix`: each of its linears alone); the masks stay exact."""
        if self.rc.granularity == "matrix":
            index = units[0][0]
            with self.adapter.prunable_linears(dense_blocks[index]) as dense_linears:
                record["matrices"] = self._train_each_linear(index, problem.halves[0], dense_halves[0], linears[index],
                                                             dense_linears, inputs, dense)
            record.update({"lr": None, **{f"loss_{s}_before": before[s] for s in SPLITS}})
            return
        masked = {id(m.weight) for i in {i for i, _ in units} for m in linears[i].values()}
        params = [p for half in problem.halves for p in trainable_parameters(half, self.rc.freeze_norms)]
        record.update(self.trainer.fit(problem, Trainable.of(params, masked), before))

    def _empty(self, like: torch.Tensor) -> torch.Tensor:
        return self.arena.empty(like.shape, like.dtype, like.device)

    def _prune(self, units, halves, linears, inputs, targets, scale):
        """Prune the submodel's halves in order on the training windows (their outputs come with it) and
        run the pruned submodel on the held-out ones; returns (outputs, losses before training)."""
        for index, _ in units:
            check_halves_cover(self.adapter, index, self.adapter.halves(self.adapter.blocks[index]), linears[index])
        work = {"train": self.arena.clone(inputs["train"])}
        for (index, _), half in zip(units, halves):
            self.pruner.prune_half(index, half, linears[index], self._stream("train", work["train"]), need_output=True)
        work["heldout"] = run_halves(
            halves,
            [i for i, _ in units],
            self._stream("heldout", inputs["heldout"]),
            self._empty(inputs["heldout"]),
            submodel_name(units),
        )
        return work, {s: stream_loss(self.rc.loss, work[s], targets[s], self.streams[s], scale) for s in SPLITS}

    def _train_each_linear(
        self,
        index: int,
        half: Half,
        dense_half: Half,
        linears: dict[str, nn.Linear],
        dense_linears: dict[str, nn.Linear],
        inputs: dict,
        dense: dict | None,
    ) -> list[dict]:
        """`matrix` granularity: each linear of the half alone, in the order the half runs them.

        Inputs: the dense half's (dense propagation) or the pruned-and-reconstructed half's; targets:
        the dense linear on those inputs, or on the dense model's own (mixed)."""
        members = {n: m for n, m in linears.items() if half.owns(m)}
        leader_of = self.pruner.groups(half, members, self._stream("train", inputs["train"]), index)
        reads_dense = self.propagation.reads_dense
        records = []
        for leader in dict.fromkeys(leader_of.values()):
            source, source_linear = (dense_half, dense_linears[leader]) if reads_dense else (half, members[leader])
            x = {
                s: linear_inputs(source, source_linear, self._stream(s, inputs[s]), index, keep=self.arena)
                for s in SPLITS
            }
            x_dense = x
            if self.propagation.separate_dense:
                x_dense = {
                    s: linear_inputs(
                        dense_half, dense_linears[leader], self._stream(s, dense[s]), index, keep=self.arena
                    )
                    for s in SPLITS
                }
            for name in [n for n in members if leader_of[n] == leader]:
                with torch.no_grad():
                    targets = {s: dense_linears[name](x_dense[s]) for s in SPLITS}
                linear = members[name]
                problem = LinearProblem(linear, x, targets, self.streams,
                                        self.trainer.channel_scale(targets["train"], self.streams["train"]))
                trainable = Trainable.of(list(linear.parameters()), {id(linear.weight)})
                before = {s: self.trainer.evaluate(problem, s) for s in SPLITS}
                result = self.trainer.train(problem, trainable, before["heldout"])
                after = {s: self.trainer.evaluate(problem, s) for s in SPLITS}
                records.append(
                    {
                        "layer": name,
                        **result,
                        **{f"loss_{s}_before": before[s] for s in SPLITS},
                        **{f"loss_{s}_after": after[s] for s in SPLITS},
                    }
                )
                del targets
            del x, x_dense
        return records


def prune_and_reconstruct(
    model: nn.Module,
    adapter: Adapter,
    input_ids: torch.Tensor,
    heldout_ids: torch.Tensor,
    config: RunConfig,
    attention_mask: torch.Tensor | None = None,
    progress: bool = True,
    observer: Callable[[dict], None] | None = None,
    checkpoints: Checkpoints | None = None,
    visits=None,
) -> tuple[list[dict], dict]:
    """Prune `model` in place and reconstruct it; returns (per-layer pruning records, reconstruction report).
    With `checkpoints`, progress is saved as it goes, and a run resumes from the newest checkpoint there;
    `visits`: see `prune_model`."""
    if heldout_ids is None or heldout_ids.shape[0] == 0:
        raise PrunelabError("reconstruction needs held-out calibration windows (reconstruct.heldout >= 1)")
    worker = Reconstructor(model, adapter, config, progress, observer, checkpoints, visits)
    summary = worker.run(input_ids, heldout_ids, attention_mask)
    return worker.pruner.records, summary
