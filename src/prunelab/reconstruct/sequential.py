"""Prune and reconstruct in one sequential pass, one submodel at a time (SPEC §3):

    capture the inputs of block 0 (training and held-out calibration windows)
    for each submodel (a half-block, K blocks, or the whole stack; `matrix` trains each linear
    of a half-block on its own):
        keep a dense copy of its blocks
        targets = the dense submodel's outputs            (which inputs: see propagation)
        prune it: its half-blocks in order, statistics from its inputs, in lockstep
        train its remaining weights to match the targets (AdamW, pruning mask kept exact)
        propagate: its outputs are the next submodel's inputs

Propagation     the submodel's inputs            its targets
    dense       dense model's activations        dense submodel(inputs), = the dense model's next activations
    sparse      pruned model's activations       dense submodel(inputs)
    mixed       pruned model's activations       dense model's next activations

Resident besides the model: the dense copy of the current submodel, its optimiser state, and
per window set (training, held-out) its inputs, targets and one working copy (plus the dense
activations in `mixed`), optionally in memory-mapped files.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable

import psutil
import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import BlockStream, _Stop, capture_block_inputs, share_inputs
from ..config import RunConfig
from ..errors import PrunelabError
from ..measure import release_memory
from ..models.adapters import Adapter, Half
from ..pipeline import HalfPruner, check_halves_cover, check_pattern_fits
from .loop import Trainable, evaluate, fit, token_loss

SPLITS = ("train", "heldout")
Unit = tuple[int, int]  # (block index, 0 = attention half / 1 = MLP half)


def submodels(blocks: int, granularity: str) -> list[list[Unit]]:
    """The half-blocks of each submodel, in model order; together they cover every half once."""
    units = [(i, part) for i in range(blocks) for part in (0, 1)]
    if granularity in ("matrix", "attn-mlp"):
        size = 1
    elif granularity == "block":
        size = 2
    elif granularity.startswith("blocks:"):
        size = 2 * int(granularity.split(":", 1)[1])
    elif granularity == "model":
        size = len(units)
    else:
        raise PrunelabError(f"no submodels for granularity {granularity!r}")
    return [units[start:start + size] for start in range(0, len(units), size)]


def submodel_name(units: list[Unit]) -> str:
    if len(units) == 1:
        return f"block {units[0][0]} {'attention' if units[0][1] == 0 else 'mlp'}"
    first, last = units[0][0], units[-1][0]
    return f"block {first}" if first == last else f"blocks {first}-{last}"


class Arena:
    """Where cached activations live: ordinary memory, or memory-mapped files (unlinked at once,
    so nothing is left on disk whatever happens)."""

    def __init__(self, on_disk: bool, folder: str | None = None):
        self.on_disk, self.folder = on_disk, folder

    def empty(self, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if not self.on_disk or device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        numel = math.prod(shape)
        fd, path = tempfile.mkstemp(prefix="prunelab-activations-", dir=self.folder)
        try:
            os.ftruncate(fd, numel * torch.empty((), dtype=dtype).element_size())
            tensor = torch.from_file(path, shared=True, size=numel, dtype=dtype)
        finally:
            os.close(fd)
            os.unlink(path)
        return tensor.view(shape)

    def clone(self, tensor: torch.Tensor) -> torch.Tensor:
        out = self.empty(tensor.shape, tensor.dtype, tensor.device)
        out.copy_(tensor)
        return out


def choose_offload(config: RunConfig, train_windows: int, held_windows: int, hidden: int,
                   device: torch.device) -> bool:
    """`auto`: on disk when the cached activations would take more than half of the free memory."""
    rc = config.reconstruct
    if rc.offload == "on" and device.type != "cpu":
        raise PrunelabError("reconstruct.offload keeps activations in memory-mapped files of CPU runs; "
                            f"this run computes on {device}")
    if rc.offload != "auto":
        return rc.offload == "on"
    copies = 4 if rc.propagation == "mixed" else 3
    size = copies * (train_windows + held_windows) * config.seqlen * hidden * 4  # float32
    return device.type == "cpu" and size > 0.5 * psutil.virtual_memory().available


@torch.no_grad()
def run_halves(halves: list[Half], units: list[Unit], stream: BlockStream, out: torch.Tensor) -> torch.Tensor:
    """The halves applied in order to every window of `stream`, batch by batch, written to `out`."""
    for b, rows in stream.batches():
        h = stream.hidden[rows]
        for (index, _), half in zip(units, halves):
            h = half(h, stream.block_kwargs[index][b])
        out[rows] = h
    if not torch.isfinite(out).all():
        raise PrunelabError(f"non-finite activations (NaN/inf) leave {submodel_name(units)}; "
                            "the model's weights or inputs are broken")
    return out


@torch.no_grad()
def capture_input(half: Half, linear: nn.Module, stream: BlockStream, index: int, arena: Arena) -> torch.Tensor:
    """The inputs of `linear` (inside `half`) on every window of `stream`; the half stops there."""
    kept: list[torch.Tensor] = []
    windows = stream.hidden.shape[0]

    def hook(module, args):
        x = args[0]
        if not kept:
            kept.append(arena.empty((windows, *x.shape[1:]), x.dtype, x.device))
        kept[0][rows] = x
        raise _Stop

    handle = linear.register_forward_pre_hook(hook)
    try:
        for b, rows in stream.batches():
            try:
                half.run(stream.hidden[rows], stream.block_kwargs[index][b])
            except _Stop:
                continue
            raise PrunelabError(f"block {index} {half.name}: the forward never reached the linear being reconstructed")
    finally:
        handle.remove()
    return kept[0]


def trainable_parameters(half: Half, freeze_norms: bool) -> list[nn.Parameter]:
    if not freeze_norms:
        return half.parameters()
    # Only the linears (and their biases): every norm is frozen, also those inside attention (q/k norms).
    linear = {id(p) for module in half.modules for m in module.modules() if isinstance(m, nn.Linear) for p in m.parameters()}
    return [p for p in half.parameters() if id(p) in linear]


def stream_loss(loss: str, pred: torch.Tensor, target: torch.Tensor, stream: BlockStream) -> float:
    """The loss over every non-pad token of the stream's windows, from outputs already computed."""
    total, tokens = 0.0, 0
    for b, rows in stream.batches():
        mask = stream.token_masks[b]
        count = int(mask.sum()) if mask is not None else pred[rows].shape[0] * pred[rows].shape[1]
        total += token_loss(loss, pred[rows], target[rows], mask).item() * count
        tokens += count
    return total / max(tokens, 1)


@dataclass
class SubmodelProblem:
    """A submodel's outputs against its targets on each window set (see loop.Problem)."""

    halves: list[Half]
    units: list[Unit]
    inputs: dict[str, BlockStream]
    targets: dict[str, torch.Tensor]

    def windows(self, split: str) -> int:
        return self.inputs[split].hidden.shape[0]

    def batch(self, split, windows):
        stream, rows = self.inputs[split], windows.tolist()
        h = stream.hidden[windows]
        for (index, _), half in zip(self.units, self.halves):
            h = half(h, stream.window_kwargs(index, rows))
        return h, self.targets[split][windows], stream.window_token_mask(rows)


@dataclass
class LinearProblem:
    """One linear layer's outputs against its dense outputs (`matrix` granularity)."""

    linear: nn.Module
    inputs: dict[str, torch.Tensor]
    targets: dict[str, torch.Tensor]
    streams: dict[str, BlockStream]  # for the windows' pad masks

    def windows(self, split: str) -> int:
        return self.inputs[split].shape[0]

    def batch(self, split, windows):
        return (self.linear(self.inputs[split][windows]), self.targets[split][windows],
                self.streams[split].window_token_mask(windows.tolist()))


@dataclass
class LearningRate:
    """A fixed lr, or `auto`: each lr of the grid is tried on the first `probe` problems (each keeps
    its best), and the one with the lowest geometric-mean held-out loss ratio serves the rest."""

    fixed: float | None
    grid: tuple[float, ...]
    probe: int
    ratios: dict[float, list[float]] = field(default_factory=dict)
    chosen: float | None = None

    def candidates(self) -> tuple[float, ...]:
        if self.fixed is not None:
            return (self.fixed,)
        return (self.chosen,) if self.chosen is not None else self.grid

    def tried(self, held_before: float, held_after: dict[float, float]) -> None:
        for lr, loss in held_after.items():
            self.ratios.setdefault(lr, []).append(max(loss, 1e-30) / max(held_before, 1e-30))
        if len(next(iter(self.ratios.values()))) >= self.probe:
            self.chosen = min(self.ratios, key=lambda lr: sum(math.log(r) for r in self.ratios[lr]))

    def summary(self) -> dict:
        if self.fixed is not None:
            return {"mode": "fixed", "lr": self.fixed}
        scores = {f"{lr:g}": math.exp(sum(math.log(r) for r in rs) / len(rs)) for lr, rs in self.ratios.items()}
        # fewer problems than `probe` (a few blocks next to layer cuts): every one was probed and kept its
        # own best; the lr reported is the best over them
        best = self.chosen if self.chosen is not None else (
            min(self.ratios, key=lambda lr: sum(math.log(r) for r in self.ratios[lr])) if self.ratios else None)
        return {"mode": "auto", "grid": list(self.grid), "probed_problems": len(next(iter(self.ratios.values()), [])),
                "heldout_loss_ratio_geomean": scores, "lr": best, "every_problem_probed": self.chosen is None}


class Trainer:
    """Trains one problem after another at a fixed learning rate or the one `auto` settles on."""

    def __init__(self, config: RunConfig):
        self.rc, self.seed = config.reconstruct, config.seed
        rc = self.rc
        self.lr = LearningRate(None if rc.lr == "auto" else float(rc.lr), tuple(rc.lr_grid), rc.lr_probe)
        self.forward_batch = config.batch_size
        self.problems = 0

    def evaluate(self, problem, split: str) -> float:
        return evaluate(problem, split, self.rc.loss, max(self.rc.batch_size, self.forward_batch))

    def train(self, problem, trainable: Trainable, held_before: float) -> dict:
        """Train at each candidate lr from the same start and keep the best on the held-out windows;
        keep the start instead when every candidate made the held-out loss worse."""
        rc = self.rc
        seed = self.seed * 100_003 + self.problems
        self.problems += 1
        candidates = self.lr.candidates()
        kwargs = dict(loss=rc.loss, epochs=rc.epochs, batch_size=rc.batch_size, warmup=rc.warmup,
                      weight_decay=rc.weight_decay, seed=seed)
        start, best, held_after = trainable.snapshot(), None, {}
        for lr in candidates:
            trainable.restore(start)
            result = fit(trainable, problem, lr, **kwargs)
            held_after[lr] = self.evaluate(problem, "heldout")
            if best is None or held_after[lr] < held_after[best[0]]:
                best = (lr, trainable.snapshot())
        trainable.restore(best[1])
        record = {"lr": best[0], "steps": result["steps"], "trainable": trainable.count()}
        if len(candidates) > 1:
            self.lr.tried(held_before, held_after)
            record["lr_probe"] = {f"{lr:g}": loss for lr, loss in held_after.items()}
        if held_after[best[0]] > held_before:
            # A submodel already (nearly) at its target: AdamW's first steps overshoot what little error
            # is left, and the held-out windows say so. Training it would only degrade the model.
            trainable.restore(start)
            record["kept_untrained"] = True
        return record


class Reconstructor:
    """The sequential prune-and-reconstruct pass over a model."""

    def __init__(self, model: nn.Module, adapter: Adapter, config: RunConfig, progress: bool = True,
                 observer: Callable[[dict], None] | None = None):
        self.model, self.adapter, self.config, self.rc = model, adapter, config, config.reconstruct
        self.progress, self.observer = progress, observer
        self.pruner = HalfPruner(config)
        self.trainer = Trainer(config)
        self.records: list[dict] = []
        self.seconds = {"targets": 0.0, "prune": 0.0, "train": 0.0, "propagate": 0.0}

    # -- the pass -------------------------------------------------------------------------------

    def run(self, input_ids: torch.Tensor, heldout_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
        check_pattern_fits(self.adapter, self.config.nm)
        blocks = self.adapter.blocks
        if self.rc.granularity == "matrix":
            for i, block in enumerate(blocks):
                for half in self.adapter.halves(block):
                    if half.writer is None:
                        raise PrunelabError(f"matrix reconstruction needs linears that every token runs; block {i}'s "
                                            f"{half.name} routes tokens to experts (use attn-mlp or coarser)")
        self.model.requires_grad_(False)  # only the current submodel's parameters get gradients
        device = next(self.model.parameters()).device
        capture = {
            "train": capture_block_inputs(self.model, blocks, input_ids, attention_mask, self.config.batch_size, torch.float32),
            "heldout": capture_block_inputs(self.model, blocks, heldout_ids, None, self.config.batch_size, torch.float32),
        }
        hidden = capture["train"].hidden.shape[-1]
        offload = choose_offload(self.config, input_ids.shape[0], heldout_ids.shape[0], hidden, device)
        self.arena = Arena(offload)
        self.streams = {s: c.with_hidden(self.arena.clone(c.hidden) if offload else c.hidden) for s, c in capture.items()}
        del capture
        mode = self.rc.propagation
        # `inputs`: what the current submodel sees; `dense`: the dense model's activations there.
        inputs = {s: self.streams[s].hidden for s in SPLITS}
        dense = {s: (self.arena.clone(inputs[s]) if mode == "mixed" else inputs[s]) for s in SPLITS} if mode != "sparse" else None

        plan = submodels(len(blocks), self.rc.granularity)
        for units in tqdm(plan, desc=f"{self.config.method} {self.config.target_label} + {self.rc.granularity} reconstruction",
                          unit="submodel", disable=not self.progress):
            inputs, dense = self._submodel(units, inputs, dense)
            self.streams = {s: self.streams[s].with_hidden(inputs[s]) for s in SPLITS}  # drop the old activations
            release_memory()
        return {"submodels": self.records, "lr": self.trainer.lr.summary(),
                "seconds": {k: round(v, 2) for k, v in self.seconds.items()}, "offload": offload,
                "problems": self.trainer.problems}

    def _submodel(self, units: list[Unit], inputs: dict, dense: dict | None):
        blocks, adapter, mode = self.adapter.blocks, self.adapter, self.rc.propagation
        indices = sorted({i for i, _ in units})
        device = inputs["train"].device
        model_dtype = next(blocks[indices[0]].parameters()).dtype
        started = time.perf_counter()
        tick = started
        record: dict = {"submodel": submodel_name(units), "blocks": indices, "halves": [list(u) for u in units]}

        def lap(phase: str) -> None:
            nonlocal tick
            now = time.perf_counter()
            self.seconds[phase] += now - tick
            tick = now

        with ExitStack() as stack:
            for i in indices:  # trainable parameters are float32 whatever the model's dtype
                blocks[i].to(torch.float32)
            dense_blocks = {i: copy.deepcopy(blocks[i]) for i in indices}
            dense_halves = [adapter.halves(dense_blocks[i])[p] for i, p in units]
            targets = {s: run_halves(dense_halves, units, self.streams[s].with_hidden(dense[s] if mode != "sparse" else inputs[s]),
                                     self.arena.empty(inputs[s].shape, inputs[s].dtype, device)) for s in SPLITS}
            lap("targets")

            linears = {i: stack.enter_context(adapter.prunable_linears(blocks[i])) for i in indices}
            halves = [adapter.halves(blocks[i])[p] for i, p in units]
            for i in indices:
                check_halves_cover(adapter, i, adapter.halves(blocks[i]), linears[i])
            work = {"train": self.arena.clone(inputs["train"])}
            for (i, _), half in zip(units, halves):
                self.pruner.prune_half(i, half, linears[i], self.streams["train"].with_hidden(work["train"]), need_output=True)
            work["heldout"] = run_halves(halves, units, self.streams["heldout"].with_hidden(inputs["heldout"]),
                                         self.arena.empty(inputs["heldout"].shape, inputs["heldout"].dtype, device))
            before = {s: stream_loss(self.rc.loss, work[s], targets[s], self.streams[s]) for s in SPLITS}
            lap("prune")

            if self.rc.granularity == "matrix":
                record["matrices"] = self._train_matrices(units[0][0], halves[0], dense_halves[0], linears[units[0][0]],
                                                          dense_blocks[units[0][0]], inputs, dense)
                record["lr"] = None
            else:
                problem = SubmodelProblem(halves, units, {s: self.streams[s].with_hidden(inputs[s]) for s in SPLITS}, targets)
                masked = {id(m.weight) for i in indices for m in linears[i].values()}
                params = [p for half in halves for p in trainable_parameters(half, self.rc.freeze_norms)]
                trainable = Trainable.of(params, masked)
                record.update(self.trainer.train(problem, trainable, before["heldout"]))
            lap("train")

            out = {s: run_halves(halves, units, self.streams[s].with_hidden(inputs[s]), work[s]) for s in SPLITS}
            after = {s: stream_loss(self.rc.loss, out[s], targets[s], self.streams[s]) for s in SPLITS}
            if self.observer is not None:
                self.observer({"units": units, "inputs": inputs["train"], "targets": targets["train"], "outputs": out["train"],
                               "record": record})
            for i in indices:
                blocks[i].to(model_dtype)
            lap("propagate")

        record.update({"loss_train_before": before["train"], "loss_train_after": after["train"],
                       "loss_heldout_before": before["heldout"], "loss_heldout_after": after["heldout"],
                       "seconds": round(time.perf_counter() - started, 2)})
        self.records.append(record)
        if mode == "dense":
            return targets, targets
        return out, (targets if mode == "mixed" else None)

    # -- training ---------------------------------------------------------------------------------

    def _train_matrices(self, index: int, half: Half, dense_half: Half, linears: dict[str, nn.Linear],
                        dense_block: nn.Module, inputs: dict, dense: dict | None) -> list[dict]:
        """`matrix` granularity: each linear of the half alone, in the order the half runs them."""
        with self.adapter.prunable_linears(dense_block) as dense_linears:
            return self._train_each_linear(index, half, dense_half, linears, dense_linears, inputs, dense)

    def _train_each_linear(self, index: int, half: Half, dense_half: Half, linears: dict[str, nn.Linear],
                           dense_linears: dict[str, nn.Linear], inputs: dict, dense: dict | None) -> list[dict]:
        mode = self.rc.propagation
        members = {n: m for n, m in linears.items() if half.owns(m)}
        leader_of = self.pruner.group_cache.get(tuple(members)) or share_inputs(half, members, self.streams["train"].with_hidden(inputs["train"]), index)
        records = []
        for leader in dict.fromkeys(leader_of.values()):
            # Inputs: the dense half's (dense propagation) or the pruned-and-reconstructed half's;
            # targets: the dense linear on those inputs, or on the dense model's own (mixed).
            source = dense_half if mode == "dense" else half
            source_linear = dense_linears[leader] if mode == "dense" else members[leader]
            x = {s: capture_input(source, source_linear, self.streams[s].with_hidden(inputs[s]), index, self.arena) for s in SPLITS}
            x_dense = ({s: capture_input(dense_half, dense_linears[leader], self.streams[s].with_hidden(dense[s]), index, self.arena)
                        for s in SPLITS} if mode == "mixed" else x)
            for name in [n for n in members if leader_of[n] == leader]:
                with torch.no_grad():
                    targets = {s: dense_linears[name](x_dense[s]) for s in SPLITS}
                linear = members[name]
                problem = LinearProblem(linear, x, targets, self.streams)
                trainable = Trainable.of([p for p in linear.parameters()], {id(linear.weight)})
                before = {s: self.trainer.evaluate(problem, s) for s in SPLITS}
                result = self.trainer.train(problem, trainable, before["heldout"])
                after = {s: self.trainer.evaluate(problem, s) for s in SPLITS}
                records.append({"layer": name, **result, **{f"loss_{s}_before": before[s] for s in SPLITS},
                                **{f"loss_{s}_after": after[s] for s in SPLITS}})
                del targets
            del x, x_dense
        return records


def prune_and_reconstruct(model: nn.Module, adapter: Adapter, input_ids: torch.Tensor, heldout_ids: torch.Tensor,
                          config: RunConfig, attention_mask: torch.Tensor | None = None, progress: bool = True,
                          observer: Callable[[dict], None] | None = None) -> tuple[list[dict], dict]:
    """Prune `model` in place and reconstruct it; returns (per-layer pruning records, reconstruction report)."""
    if heldout_ids is None or heldout_ids.shape[0] == 0:
        raise PrunelabError("reconstruction needs held-out calibration windows (reconstruct.heldout >= 1)")
    worker = Reconstructor(model, adapter, config, progress, observer)
    summary = worker.run(input_ids, heldout_ids, attention_mask)
    return worker.pruner.records, summary
