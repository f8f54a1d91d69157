"""Reconstruction after structured pruning: the remaining blocks learn to reproduce the dense model.

Each block j of the pruned model stands for a span of dense blocks: after FLAP its own block; after
layer removal the block itself and the removed blocks that followed it (block 0 also stands for any
removed before it). In model order, on training and held-out windows (propagation as in propagation.py):

    inputs  = the pruned model's activations entering block j (dense: the dense model's, at the span's start)
    targets = the dense span applied to those inputs (sparse, dense), or the dense model's own
              activations at the span's end (mixed)
    train block j (each half alone under attn-mlp when its span is one block; the whole block when
    it must also stand in for removed ones), then propagate its outputs.

Blocks left out of training (`scope: adjacent` trains only the blocks next to a cut) still propagate.
Nothing is masked: structured pruning leaves dense, smaller weights.

Magnitude compensation multiplies everything written before a cut at v by s_v, so the pruned stream
entering dense position p is C(p) = Π_{cuts v ≥ p} s_v times the dense one (1 after the last cut).
Dense activations are compared in that frame: a block spanning [p, q) gets dense inputs × C(p) and
dense targets × C(q); the sparse targets run the dense span on its input / C(p), then × C(q).
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from ..activations import capture_block_inputs, run_halves
from ..config import RunConfig
from ..errors import PrunelabError
from ..measure import release_memory
from ..models.adapters import find_adapter
from ..precision import autocast, held_in_float32, matmul_precision, uses_bfloat16
from .loop import Trainable
from .propagation import Propagation
from .step import SPLITS, SubmodelProblem, Trainer, trainable_parameters


def spans_after_removal(kept: list[int], dense_blocks: int) -> list[range]:
    """The dense blocks each remaining block stands for; together they cover every dense block once."""
    bounds = [0, *kept[1:], dense_blocks]
    return [range(bounds[j], bounds[j + 1]) for j in range(len(kept))]


def structure_spans(structure: dict, dense: nn.Module) -> list[range]:
    """Spans from a structured-pruning report: layer removal keeps `kept`; FLAP keeps every block."""
    blocks = len(find_adapter(dense).blocks)
    if "kept" in structure:
        return spans_after_removal(structure["kept"], blocks)
    return [range(i, i + 1) for i in range(blocks)]


def compensation_frames(structure: dict, spans: list[range]) -> list[tuple[float, float]]:
    """(C(p), C(q)) for each remaining block's span [p, q): how much larger than the dense model's the
    pruned stream is where the span starts and ends (all 1 without compensation)."""
    cuts = []  # (dense position of the cut, s)
    for step in structure.get("steps", []):
        scale = step.get("scale")
        if scale is None:
            continue
        if isinstance(scale, list):
            cuts += zip(step["removed"], scale)
        else:  # a contiguous span removed at once (cl): one fold before its first block
            cuts.append((min(step["removed"]), scale))

    def frame(position: int) -> float:
        return math.prod(s for v, s in cuts if v >= position)

    return [(frame(span.start), frame(span.stop)) for span in spans]


def reconstruct_structured(model: nn.Module, dense: nn.Module, structure: dict, input_ids: torch.Tensor,
                           heldout_ids: torch.Tensor, config: RunConfig, attention_mask: torch.Tensor | None = None,
                           progress: bool = True) -> dict:
    """Train the pruned `model`'s blocks in place against `dense` (see the module docstring);
    `structure` is the structured-pruning report (which blocks remain, the compensation folded)."""
    if heldout_ids is None or heldout_ids.shape[0] == 0:
        raise PrunelabError("reconstruction needs held-out calibration windows (reconstruct.heldout >= 1)")
    spans = structure_spans(structure, dense)
    run = StructuredRun(model, dense, config, compensation_frames(structure, spans))
    run.capture(input_ids, heldout_ids, attention_mask)
    rc = config.reconstruct
    device = next(model.parameters()).device
    bfloat16 = uses_bfloat16(rc.precision, device)
    for j, span in enumerate(tqdm(spans, desc=f"{config.method} + {rc.granularity} reconstruction", unit="block",
                                  disable=not progress)):
        with autocast(bfloat16, device):
            if rc.scope == "all" or len(span) > 1 or config.method == "flap":
                run.train_block(j, span)
            else:
                run.skip_block(j, span)
        release_memory()
    return {"submodels": run.records, "lr": run.trainer.lr.summary(), "problems": run.trainer.problems,
            "scope": rc.scope, "propagation": rc.propagation, "precision": matmul_precision(bfloat16)}


class StructuredRun:
    """The pruned model's and the dense model's activations, advanced block by block."""

    def __init__(self, model: nn.Module, dense: nn.Module, config: RunConfig, frames: list[tuple[float, float]]):
        self.model, self.dense, self.config, self.frames = model, dense, config, frames
        self.adapter, self.dense_adapter = find_adapter(model), find_adapter(dense)
        self.propagation = Propagation(config.reconstruct.propagation)
        self.trainer, self.records = Trainer(config), []
        model.requires_grad_(False)
        dense.requires_grad_(False)

    def capture(self, input_ids, heldout_ids, attention_mask) -> None:
        ids = {"train": (input_ids, attention_mask), "heldout": (heldout_ids, None)}
        batch = self.config.forward_batch
        self.streams = {s: capture_block_inputs(self.model, self.adapter.blocks, x, m, batch, torch.float32)
                        for s, (x, m) in ids.items()}
        self.dense_streams = {s: capture_block_inputs(self.dense, self.dense_adapter.blocks, x, m, batch, torch.float32)
                              for s, (x, m) in ids.items()}
        self.h = {s: self.streams[s].hidden for s in SPLITS}  # the pruned model's activations
        self.dense_h = ({s: self.dense_streams[s].hidden.clone() for s in SPLITS}  # the dense model's
                        if self.propagation.keeps_dense else None)

    def dense_run(self, units: list[tuple[int, int]], x: dict) -> dict:
        halves = [self.dense_adapter.halves(self.dense_adapter.blocks[d])[p] for d, p in units]
        return {s: run_halves(halves, [d for d, _ in units], self.dense_streams[s].with_hidden(x[s]),
                              torch.empty_like(x[s]), f"dense blocks {units[0][0]}-{units[-1][0]}") for s in SPLITS}

    def in_float32(self, j: int, span: range):
        """Block j and the dense blocks of its span in float32 for the while: the streams are float32."""
        return held_in_float32(self.adapter.blocks[j], *(self.dense_adapter.blocks[d] for d in span))

    def skip_block(self, j: int, span: range) -> None:
        """A block left out of training still propagates both streams."""
        with self.in_float32(j, span):
            if not self.propagation.reads_dense:
                halves = list(self.adapter.halves(self.adapter.blocks[j]))
                self.h = {s: run_halves(halves, [j, j], self.streams[s].with_hidden(self.h[s]),
                                        torch.empty_like(self.h[s]), f"block {j}") for s in SPLITS}
            if self.dense_h is not None:
                self.dense_h = self.dense_run([(d, p) for d in span for p in (0, 1)], self.dense_h)

    def train_block(self, j: int, span: range) -> None:
        """Block j (each half alone under attn-mlp when its span is one block; whole when it must also stand
        in for removed blocks) trained against the dense span, in the compensated frame."""
        with self.in_float32(j, span):
            halves = self.adapter.halves(self.adapter.blocks[j])
            apart = self.config.reconstruct.granularity == "attn-mlp" and len(span) == 1 and not halves[0].deferred
            groups = [[0], [1]] if apart else [[0, 1]]  # a parallel block's halves have nothing between them to match
            for parts in groups:
                dense_units = [(d, p) for d in span for p in (parts if len(span) == 1 else (0, 1))]
                self._train_halves(j, span, [halves[p] for p in parts], parts, dense_units)

    def _train_halves(self, j: int, span: range, trained: list, parts: list[int], dense_units) -> None:
        started, rc = time.perf_counter(), self.config.reconstruct
        next_dense = self.dense_run(dense_units, self.dense_h) if self.dense_h is not None else None
        a = self.frames[j][0]
        b = self.frames[j][1] if parts[-1] == 1 else a  # a cut can only follow an MLP half
        inputs = {s: self.dense_h[s] * a for s in SPLITS} if self.propagation.reads_dense else self.h
        if self.propagation.targets_from_pruned:
            targets = {s: t * b for s, t in self.dense_run(dense_units, {s: self.h[s] / a for s in SPLITS}).items()}
        else:
            targets = {s: next_dense[s] * b for s in SPLITS}
        streams = {s: self.streams[s].with_hidden(inputs[s]) for s in SPLITS}
        problem = SubmodelProblem(trained, [j] * len(parts), streams, targets,
                                  self.trainer.channel_scale(targets["train"], self.streams["train"]))
        name = f"block {j}" + ("" if len(parts) == 2 else f" {trained[0].name}")
        trainable = Trainable.of([p for half in trained for p in trainable_parameters(half, rc.freeze_norms)], set())
        record = {"submodel": name, "dense_blocks": list(span), **self.trainer.fit(problem, trainable)}
        out = self.trainer.outputs(problem, record, name)
        record["seconds"] = round(time.perf_counter() - started, 2)
        self.records.append(record)
        self.h, self.dense_h = out, next_dense
