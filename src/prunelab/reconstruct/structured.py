"""Reconstruction after structured pruning: the remaining blocks learn to reproduce the dense model.

Each block j of the pruned model stands for a span of dense blocks: after FLAP its own block; after
layer removal the block itself and the removed blocks that followed it (block 0 also stands for any
removed before it). In model order, on training and held-out windows (propagation as in SPEC §3):

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

from ..calibration import capture_block_inputs
from ..config import RunConfig
from ..errors import PrunelabError
from ..measure import release_memory
from ..models.adapters import find_adapter
from .loop import Trainable
from .sequential import SPLITS, SubmodelProblem, Trainer, run_halves, stream_loss, trainable_parameters


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
    spans = structure_spans(structure, dense)
    frames = compensation_frames(structure, spans)
    rc = config.reconstruct
    if heldout_ids is None or heldout_ids.shape[0] == 0:
        raise PrunelabError("reconstruction needs held-out calibration windows (reconstruct.heldout >= 1)")
    adapter, dense_adapter = find_adapter(model), find_adapter(dense)
    model.requires_grad_(False)
    dense.requires_grad_(False)
    ids = {"train": (input_ids, attention_mask), "heldout": (heldout_ids, None)}
    streams = {s: capture_block_inputs(model, adapter.blocks, x, m, config.batch_size, torch.float32) for s, (x, m) in ids.items()}
    dense_streams = {s: capture_block_inputs(dense, dense_adapter.blocks, x, m, config.batch_size, torch.float32)
                     for s, (x, m) in ids.items()}
    mode = rc.propagation
    h = {s: streams[s].hidden for s in SPLITS}  # the pruned model's activations
    dense_h = {s: dense_streams[s].hidden.clone() for s in SPLITS} if mode != "sparse" else None  # the dense model's

    def dense_run(units: list[tuple[int, int]], x: dict) -> dict:
        dense_halves = [dense_adapter.halves(dense_adapter.blocks[d])[p] for d, p in units]
        return {s: run_halves(dense_halves, units, dense_streams[s].with_hidden(x[s]), torch.empty_like(x[s])) for s in SPLITS}

    trainer, records = Trainer(config), []
    for j, span in enumerate(tqdm(spans, desc=f"{config.method} + {rc.granularity} reconstruction", unit="block",
                                  disable=not progress)):
        block = adapter.blocks[j]
        halves = adapter.halves(block)
        if not (rc.scope == "all" or len(span) > 1 or config.method == "flap"):  # not trained: propagate only
            if mode != "dense":
                h = {s: run_halves(list(halves), [(j, 0), (j, 1)], streams[s].with_hidden(h[s]), torch.empty_like(h[s]))
                     for s in SPLITS}
            if dense_h is not None:
                dense_h = dense_run([(d, p) for d in span for p in (0, 1)], dense_h)
            continue
        dtype = next(block.parameters()).dtype
        block.to(torch.float32)  # trainable parameters are float32 whatever the model's dtype
        for d in span:
            dense_adapter.blocks[d].to(torch.float32)
        groups = [[0], [1]] if rc.granularity == "attn-mlp" and len(span) == 1 else [[0, 1]]
        for parts in groups:
            started = time.perf_counter()
            units = [(j, p) for p in parts]
            dense_units = [(d, p) for d in span for p in (parts if len(span) == 1 else (0, 1))]
            next_dense = dense_run(dense_units, dense_h) if dense_h is not None else None
            a, b = frames[j][0], (frames[j][1] if parts[-1] == 1 else frames[j][0])  # a cut can only follow an MLP half
            inputs = {s: dense_h[s] * a for s in SPLITS} if mode == "dense" else h
            if mode == "sparse":
                targets = {s: t * b for s, t in dense_run(dense_units, {s: h[s] / a for s in SPLITS}).items()}
            else:
                targets = {s: next_dense[s] * b for s in SPLITS}
            trained = [halves[p] for p in parts]
            problem = SubmodelProblem(trained, units, {s: streams[s].with_hidden(inputs[s]) for s in SPLITS}, targets)
            before = {s: trainer.evaluate(problem, s) for s in SPLITS}
            trainable = Trainable.of([p for half in trained for p in trainable_parameters(half, rc.freeze_norms)], set())
            result = trainer.train(problem, trainable, before["heldout"])
            out = {s: run_halves(trained, units, streams[s].with_hidden(inputs[s]), torch.empty_like(inputs[s])) for s in SPLITS}
            after = {s: stream_loss(rc.loss, out[s], targets[s], streams[s]) for s in SPLITS}
            name = f"block {j}" + ("" if len(parts) == 2 else f" {trained[0].name}")
            records.append({"submodel": name, "dense_blocks": list(span), **result,
                            **{f"loss_{s}_before": before[s] for s in SPLITS}, **{f"loss_{s}_after": after[s] for s in SPLITS},
                            "seconds": round(time.perf_counter() - started, 2)})
            h, dense_h = out, next_dense
            del targets
        block.to(dtype)
        for d in span:
            dense_adapter.blocks[d].to(dtype)
        release_memory()
    return {"submodels": records, "lr": trainer.lr.summary(), "problems": trainer.problems, "scope": rc.scope,
            "propagation": mode}

