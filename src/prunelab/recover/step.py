"""One submodel's recovery step, shared by every reconstruction (after zeroing weights and after
removing structure):

    fit:      losses before (on training and held-out windows), then train its parameters at the
              learning rate(s) the `LearningRate` policy says, keeping the best on held-out windows
    outputs:  its outputs on both window sets (the next submodel's inputs) and its losses after

`Trainer` holds what carries from one submodel to the next: the learning-rate choice and the seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import distributed
from ..activations import BlockStream, run_halves
from ..config import RunConfig
from ..models.adapters import Half
from .loop import SCALED_LOSSES, Diverged, Trainable, channel_scale, evaluate, finite_or_inf, fit, token_loss

SPLITS = ("train", "heldout")


def trainable_parameters(half: Half, freeze_norms: bool) -> list[nn.Parameter]:
    if not freeze_norms:
        return half.parameters()
    # Only the linears (and their biases): every norm is frozen, also those inside attention (q/k norms).
    linear = {id(p) for module in half.modules for m in module.modules() if isinstance(m, nn.Linear)
              for p in m.parameters()}
    return [p for p in half.parameters() if id(p) in linear]


def stream_loss(loss: str, pred: torch.Tensor, target: torch.Tensor, stream: BlockStream,
                scale: torch.Tensor | None = None) -> float:
    """The loss over every non-pad token of the stream's windows, from outputs already computed."""
    total, tokens = 0.0, 0
    for b, rows in stream.batches():
        mask = stream.token_masks[b]
        count = int(mask.sum()) if mask is not None else pred[rows].shape[0] * pred[rows].shape[1]
        total += token_loss(loss, pred[rows], target[rows], mask, scale).item() * count
        tokens += count
    total, tokens = distributed.all_sum_float(total), distributed.all_sum_float(tokens)  # data parallel
    return total / max(tokens, 1)


@dataclass
class SubmodelProblem:
    """A submodel (half-blocks of the decoder blocks `blocks`) against its targets on each window set
    (see loop.Problem)."""

    halves: list[Half]
    blocks: list[int]  # the decoder block of each half
    inputs: dict[str, BlockStream]
    targets: dict[str, torch.Tensor]
    scale: torch.Tensor | None = None  # see loop.Problem

    def windows(self, split: str) -> int:
        return self.inputs[split].hidden.shape[0]

    def batch(self, split, windows):
        """The submodel's outputs, targets and pad masks of `windows`, run in groups whose arguments stack
        (padded windows apart from unpadded ones; the windows are independent, and their order free)."""
        stream, outputs, order = self.inputs[split], [], []
        for group in stream.alike(windows.tolist()):
            h = stream.hidden[group]
            for index, half in zip(self.blocks, self.halves):
                h = half(h, stream.window_kwargs(index, group))
            outputs.append(h)
            order += group
        return torch.cat(outputs), self.targets[split][order], stream.window_token_mask(order)


@dataclass
class LinearProblem:
    """One linear layer's outputs against its dense outputs (`matrix` granularity)."""

    linear: nn.Module
    inputs: dict[str, torch.Tensor]
    targets: dict[str, torch.Tensor]
    streams: dict[str, BlockStream]  # for the windows' pad masks
    scale: torch.Tensor | None = None  # see loop.Problem

    def windows(self, split: str) -> int:
        return self.inputs[split].shape[0]

    def batch(self, split, windows):
        return (self.linear(self.inputs[split][windows]), self.targets[split][windows],
                self.streams[split].window_token_mask(windows.tolist()))


def _finite(value: float) -> float | None:
    """None for a diverged probe (JSON has no infinity)."""
    return value if math.isfinite(value) else None


def _log_mean(ratios: list[float]) -> float:
    return sum(math.log(r) for r in ratios) / len(ratios)


@dataclass
class LearningRate:
    """A fixed lr, or `auto`: the lrs of the grid are each trained from the same start on the first `probe`
    problems (each problem keeps its best), and the one with the lowest geometric-mean held-out loss ratio
    over them serves the rest.

    To spend less on the probe, an lr at either end of the remaining grid is dropped after a problem on
    which it did `TRIM` times worse than its inner neighbour (at most one per end per problem, never
    fewer than two left). Only an edge goes: the held-out loss is unimodal in the lr in every probe
    recorded, so an edge that loses to its neighbour is not the best of the problem; the geometric mean
    over the remaining lrs still punishes one that fails on a single problem, which is wanted: on
    SmolLM2 1e-2 is the best of three of the four probed halves and ruins block 0's attention, and at
    1e-2 throughout the model ends at perplexity 32.5 against 29.9 at the 3e-3 the mean picks."""

    TRIM = 1.1

    fixed: float | None
    grid: tuple[float, ...]
    probe: int
    ratios: dict[float, list[float]] = field(default_factory=dict)
    remaining: list[float] = field(default_factory=list)
    dropped: dict[float, int] = field(default_factory=dict)  # lr -> the probed problem after which it went
    probed: int = 0
    chosen: float | None = None

    def __post_init__(self):
        self.remaining = sorted(self.grid)

    def candidates(self) -> tuple[float, ...]:
        if self.fixed is not None:
            return (self.fixed,)
        return (self.chosen,) if self.chosen is not None else tuple(self.remaining)

    def tried(self, held_before: float, held_after: dict[float, float]) -> None:
        for lr, loss in held_after.items():
            self.ratios.setdefault(lr, []).append(max(loss, 1e-30) / max(held_before, 1e-30))
        self.probed += 1
        for edge, inner in ((0, 1), (-1, -2)):
            lrs = self.remaining
            if len(lrs) > 2 and held_after[lrs[edge]] > self.TRIM * held_after[lrs[inner]]:
                self.dropped[lrs.pop(edge)] = self.probed
        if self.probed >= self.probe:
            self.chosen = self._best()

    def _best(self) -> float:
        return min(self.remaining, key=lambda lr: _log_mean(self.ratios[lr]))

    def summary(self) -> dict:
        if self.fixed is not None:
            return {"mode": "fixed", "lr": self.fixed}
        # over every probed problem: only the rates never dropped (a dropped one's mean covers fewer problems)
        probed = [lr for lr in self.remaining if lr in self.ratios]
        scores = {f"{lr:g}": _finite(math.exp(_log_mean(self.ratios[lr]))) for lr in probed}
        # fewer problems than `probe` (a few blocks next to layer cuts): every one was probed and kept its
        # own best; the lr reported is the best over them
        best = self.chosen if self.chosen is not None else (self._best() if self.probed else None)
        return {"mode": "auto", "grid": list(self.grid), "probed_problems": self.probed,
                "heldout_loss_ratio_geomean": scores, "dropped_after": {f"{lr:g}": n for lr, n in self.dropped.items()},
                "lr": best, "every_problem_probed": self.chosen is None}


class Trainer:
    """Trains one problem after another at a fixed learning rate or the one `auto` settles on."""

    def __init__(self, config: RunConfig):
        self.rc, self.seed = config.reconstruct, config.seed
        rc = self.rc
        self.lr = LearningRate(None if rc.lr == "auto" else float(rc.lr), tuple(rc.lr_grid), rc.lr_probe)
        self.forward_batch = config.forward_batch
        self.problems = 0
        self.spill_snapshots = False  # a streamed model: the start and best weights wait in temporary files

    def channel_scale(self, targets: torch.Tensor, stream: BlockStream) -> torch.Tensor | None:
        """What a problem on these training targets needs beside them for the configured loss (`cmse`)."""
        return channel_scale(targets, stream.window_token_mask) if self.rc.loss in SCALED_LOSSES else None

    def evaluate(self, problem, split: str) -> float:
        return evaluate(problem, split, self.rc.loss, max(self.rc.batch_size, self.forward_batch))

    def state(self) -> dict:
        """What carries to the next problem, as JSON (for a checkpoint; lrs as exact float reprs)."""
        lr = self.lr
        return {"problems": self.problems, "probed": lr.probed, "chosen": lr.chosen, "remaining": lr.remaining,
                "ratios": {repr(k): v for k, v in lr.ratios.items()},
                "dropped": {repr(k): v for k, v in lr.dropped.items()}}

    def load_state(self, state: dict) -> None:
        lr = self.lr
        self.problems, lr.probed, lr.chosen, lr.remaining = (state["problems"], state["probed"], state["chosen"],
                                                             state["remaining"])
        lr.ratios = {float(k): v for k, v in state["ratios"].items()}
        lr.dropped = {float(k): v for k, v in state["dropped"].items()}

    def train(self, problem, trainable: Trainable, held_before: float) -> dict:
        """Train at each candidate lr from the same start and keep the best on the held-out windows;
        keep the start instead when every candidate made the held-out loss worse."""
        rc = self.rc
        seed = self.seed * 100_003 + self.problems
        self.problems += 1
        candidates = self.lr.candidates()
        kwargs = dict(loss=rc.loss, epochs=rc.epochs, batch_size=rc.batch_size, warmup=rc.warmup,
                      weight_decay=rc.weight_decay, seed=seed)
        start, best, held_after = trainable.snapshot(self.spill_snapshots), None, {}
        for k, lr in enumerate(candidates):
            if k:
                trainable.restore(start)
            try:
                result = fit(trainable, problem, lr, **kwargs)
            except Diverged:
                if len(candidates) == 1:
                    raise
                held_after[lr] = math.inf  # a probe that diverges loses; the others go on
                continue
            held_after[lr] = finite_or_inf(self.evaluate(problem, "heldout"))  # NaN would never compare worse
            if best is None or held_after[lr] < held_after[best[0]]:  # the last one stays in place
                best = (lr, trainable.snapshot(self.spill_snapshots) if k < len(candidates) - 1 else None)
        if best is None:
            raise Diverged(f"reconstruction diverged at every lr of the grid {list(candidates)}; choose a smaller "
                           "--lr-grid")
        if best[1] is not None:
            trainable.restore(best[1])
        record = {"lr": best[0], "steps": result["steps"], "trainable": trainable.count()}
        if len(candidates) > 1:
            self.lr.tried(held_before, held_after)
            record["lr_probe"] = {f"{lr:g}": _finite(loss) for lr, loss in held_after.items()}
        if held_after[best[0]] > held_before:
            # A submodel already (nearly) at its target: AdamW's first steps overshoot what little error
            # is left, and the held-out windows say so. Training it would only degrade the model.
            trainable.restore(start)
            record["kept_untrained"] = True
        return record

    def fit(self, problem: SubmodelProblem, trainable: Trainable, before: dict[str, float] | None = None) -> dict:
        """Losses before (unless a pass already made gave them: pruning computes the outputs anyway),
        then training; returns the submodel's record so far."""
        if before is None:
            before = {s: self.evaluate(problem, s) for s in SPLITS}
        record = self.train(problem, trainable, before["heldout"])
        record.update({f"loss_{s}_before": before[s] for s in SPLITS})
        return record

    def outputs(self, problem: SubmodelProblem, record: dict, name: str,
                buffers: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The trained submodel's outputs on both window sets (into `buffers` if given), and its losses
        after training added to `record`."""
        out = {}
        for s in SPLITS:
            stream = problem.inputs[s]
            buffer = buffers[s] if buffers is not None else torch.empty_like(stream.hidden)
            out[s] = run_halves(problem.halves, problem.blocks, stream, buffer, name)
            record[f"loss_{s}_after"] = stream_loss(self.rc.loss, out[s], problem.targets[s], stream, problem.scale)
        return out
