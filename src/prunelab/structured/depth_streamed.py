"""Layer removal (depth.py) of a model larger than memory, with the `bi` or `mag` metric.

The blocks stay in the checkpoint. Each scoring round is one pass over the remaining blocks, one in
memory at a time, on the calibration stream. The compensation folded after a removal is kept as scale
factors (the embeddings', each earlier block's residual writers', the final norm's when the head shares
the embedding) that are applied whenever a block is read, so every round sees the model the whole-model
run would hold. At the end the kept blocks are written renumbered, and the embeddings and final norm with
their scales. `taylor` and `ppl` need the LM head's loss through the whole model and `cl` keeps one stream
per block of its span; they are refused for streamed models.
"""

from __future__ import annotations

import torch
from accelerate.utils import set_module_tensor_to_device
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..activations import capture_block_inputs
from ..config import RunConfig
from ..errors import PrunelabError
from ..models.adapters import first_output, scale_output
from .depth import Survey, _weights, check_depth, head_shares_source, remove_blocks, remove_in_rounds

STREAMED_METRICS = ("bi", "mag")


class StreamedDepth:
    """A streamed model as `depth.remove_in_rounds` scores, compensates and shortens it."""

    def __init__(self, streamed, ids: torch.Tensor | None, batch: int, progress: bool):
        self.streamed, self.ids, self.batch, self.progress = streamed, ids, batch, progress
        count = len(streamed.adapter.blocks)
        self.kept = list(range(count))  # original index of each remaining block
        self.block_scale = [1.0] * count  # of each block's residual writers
        self.embed_scale = 1.0  # of the residual sources (embeddings)
        self.norm_scale = 1.0  # of the final norm, when the LM head shares the embedding
        self.head_scaled = head_shares_source(streamed.model, streamed.adapter)

    def _load(self, index: int) -> nn.Module:
        block = self.streamed.load_block(index)
        if self.block_scale[index] != 1.0:
            for module in self.streamed.adapter.residual_writers(block):
                scale_output(module, self.block_scale[index])
        return block

    def score(self, metric: str) -> tuple[torch.Tensor, Survey | None]:
        if metric == "bi":
            found = self.survey()
            return found.distance.clone(), found
        if metric == "mag":  # a block's own weights, as stored
            scores = []
            for index in self.kept:
                scores.append(sum(float(w.detach().abs().sum()) for w in _weights(self.streamed.load_block(index))))
                self.streamed.drop_block(index)
            return torch.tensor(scores), None
        raise PrunelabError(f"depth metric {metric!r} cannot score a streamed model "
                            f"({', '.join(STREAMED_METRICS)} can)")

    @torch.no_grad()
    def survey(self) -> Survey:
        """`depth.survey` (span 1) over the remaining blocks, each read once."""
        streamed = self.streamed
        with streamed.outer("input") as model:
            stream = capture_block_inputs(model, streamed.adapter.blocks, self.ids, None, self.batch, torch.float32)
        stream.hidden.mul_(self.embed_scale)
        distance = torch.zeros(len(self.kept), dtype=torch.float64)
        scale = torch.zeros(len(self.kept), dtype=torch.float64)
        for position, index in enumerate(tqdm(self.kept, desc="block influence", unit="block", leave=False,
                                              disable=not self.progress)):
            block = self._load(index)
            for b, rows in stream.batches():
                h = stream.hidden[rows]
                dtype = streamed.compute_dtype
                out = first_output(block(h.to(dtype), **stream.arguments(index, b, dtype))).float()
                distance[position] += float((1 - nn.functional.cosine_similarity(h, out, dim=-1, eps=1e-8)).sum())
                ratio = out.abs().mean(1) / h.abs().mean(1).clamp_min(1e-12)
                scale[position] += float(ratio.mean(-1).sum())
                stream.hidden[rows] = out
            streamed.drop_block(index)
        windows, seqlen = self.ids.shape
        distance, scale = distributed.all_sum(distance), distributed.all_sum(scale)
        windows = distributed.all_sum_float(windows)
        if not torch.isfinite(distance).all() or not torch.isfinite(scale).all():
            raise PrunelabError("non-finite activations (NaN/inf) in the decoder blocks; the model's weights or "
                                "inputs are broken")
        return Survey(distance / (windows * seqlen), scale / windows)

    def fold(self, position: int, s: float) -> None:
        """`depth.fold_compensation`, as scale factors."""
        self.embed_scale *= s
        if self.head_scaled:
            self.norm_scale /= s
        for index in self.kept[:position]:
            self.block_scale[index] *= s

    def remove(self, positions: list[int]) -> None:
        for position in sorted(positions, reverse=True):
            del self.kept[position]

    def write(self, writer) -> None:
        """The kept blocks renumbered into the output's shards, their scales applied; then the tensors
        outside the blocks, the scaled ones among them."""
        streamed, prefix = self.streamed, self.streamed.prefix
        writer.renumber(len(self.kept))
        if not distributed.is_main():  # data parallel: process 0 writes
            return
        for new, index in enumerate(tqdm(self.kept, desc="write kept blocks", unit="block",
                                         disable=not self.progress)):
            self._load(index)
            old = f"{prefix}.{index}."
            state = streamed.block_state(index)
            elsewhere = sorted(name for name in state if not name.startswith(old))  # experts stored otherwise
            if elsewhere:
                raise PrunelabError(f"cannot renumber block {index}: the checkpoint stores its tensors under "
                                    f"{elsewhere[0]}, not {old}...")
            writer.write(new, {f"{prefix}.{new}.{name[len(old):]}": tensor for name, tensor in state.items()})
            streamed.drop_block(index)
        if self.embed_scale != 1.0:
            for module in streamed.adapter.residual_sources():
                writer.replace(self._scaled(module, self.embed_scale))
        if self.head_scaled and self.norm_scale != 1.0:
            writer.replace(self._scaled(streamed.adapter.final_norm(), self.norm_scale))

    def _scaled(self, module: nn.Module, s: float) -> dict[str, torch.Tensor]:
        """`module`'s stored tensors with its output scaled by `s`, in the checkpoint's dtype."""
        model, source = self.streamed.model, self.streamed.source
        prefix = next(name for name, m in model.named_modules() if m is module)
        names = [f"{prefix}.{key}" for key, _ in module.named_parameters(recurse=False)]
        for name, tensor in source.tensors([n for n in names if n in source.files]):
            set_module_tensor_to_device(model, name, "cpu", value=tensor)
        scale_output(module, s)
        out = {f"{prefix}.{key}": param.detach().clone() for key, param in module.named_parameters(recurse=False)}
        for name in out:
            set_module_tensor_to_device(model, name, "meta")
        model.tie_weights()
        return out


def prune_depth_streamed(visits, ids: torch.Tensor | None, config: RunConfig, progress: bool = True) -> dict:
    """`depth.prune_depth` of a streamed model (`visits`: streaming.StreamedPruning); the kept blocks are
    written to `visits.writer`, and the skeleton is shortened as the model would be."""
    dc, streamed = config.depth, visits.streamed
    check_depth(streamed.adapter, config)  # (the metric: refused before any work, job.streaming_source)
    head_scaled = head_shares_source(streamed.model, streamed.adapter)
    if dc.compensation and head_scaled and streamed.adapter.final_norm() is None:
        raise PrunelabError("a streamed model with tied embeddings and no final norm cannot take the compensation "
                            "(--no-compensation)")
    if ids is None and (dc.metric != "mag" or dc.compensation):
        raise PrunelabError(f"depth metric {dc.metric}{' with compensation' if dc.metric == 'mag' else ''} "
                            "needs calibration windows")
    count = len(streamed.adapter.blocks)
    origin = list(range(count))
    report = {"metric": dc.metric, "compensation": dc.compensation, "one_shot": dc.one_shot, "blocks_before": count,
              "head": ("tied: final norm counter-scaled" if head_scaled else "separate head")
              if dc.compensation else None, "steps": []}
    target = StreamedDepth(streamed, ids, config.forward_batch, progress)
    remove_in_rounds(target, config, origin, report["steps"], progress)
    target.write(visits.writer)
    removed = sorted(set(range(count)) - set(origin))
    remove_blocks(streamed.model, streamed.adapter, removed)
    return {**report, "removed": removed, "kept": origin, "blocks_after": len(origin)}
