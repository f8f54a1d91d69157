"""Depth pruning with Prune&Comp (arXiv 2507.18212; docs/DESIGN.md): remove whole decoder blocks, one at a
time, and fold a magnitude-compensation scalar into the weights that write the residual stream before each cut.

    repeat `remove` times (all at once with one_shot):
        score every remaining block on the calibration windows     (bi | taylor | mag | ppl)
        remove the least important block ℓ
        s = mean over windows and channels of  mean_t |h_{ℓ+1}| / mean_t |h_ℓ|
              (h_ℓ the block's input, h_{ℓ+1} its output, measured before the removal)
        scale the embeddings and every earlier block's residual writers by s, so that block ℓ+1
        receives s·h_ℓ, about the magnitude it was trained on, at no runtime cost
    cl scores contiguous spans instead and removes the span [i, i+n) whose input and output agree
    most, once; its s compares h_{i+n} with h_i.

Metrics (lower = less important):
    bi      mean over tokens of 1 − cos(h_ℓ, h_{ℓ+1})           (block influence)
    cl      mean over tokens of 1 − cos(h_i, h_{i+n})           (contiguous span)
    taylor  Σ |W ⊙ ∂L/∂W| over the block's linear weights, L the language-model loss  (Taylor+)
    mag     Σ |W| over the block's linear weights, scored once: removal leaves them alone   (Mag+)
    ppl     the language-model loss with the block skipped
taylor and mag never remove the first `protect_first` or last `protect_last` blocks (the "+" of
the reference: 4 and 2).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..activations import StandIn, as_block_returns, run_blocks
from ..config import DEPTH_METRICS, RunConfig
from ..errors import PrunelabError
from ..models.adapters import Adapter, scale_output, tied_head


@dataclass
class Survey:
    """How much each span of `span` blocks changes the residual stream, over the calibration windows."""

    distance: torch.Tensor  # [L − span + 1] mean over tokens of 1 − cos(h_i, h_{i+span})
    scale: torch.Tensor  # [L − span + 1] mean over windows and channels of mean_t |h_{i+span}| / mean_t |h_i|


@torch.no_grad()
def survey(
    model: nn.Module,
    adapter: Adapter,
    ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    batch_size: int,
    span: int = 1,
) -> Survey:
    """One pass through the blocks (no LM head), keeping only the last `span` + 1 residual states."""
    blocks = adapter.blocks
    starts = len(blocks) - span + 1
    distance, scale = torch.zeros(starts, dtype=torch.float64), torch.zeros(starts, dtype=torch.float64)
    tokens = windows = 0
    for i, mask, h, out in run_blocks(model, blocks, ids, attention_mask, batch_size):
        if i == 0:
            keep = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device) if mask is None else mask
            tokens += int(keep.sum())
            windows += h.shape[0]
            states = deque([h], maxlen=span + 1)
        states.append(out)
        if i + 1 >= span:
            first, last = states[0], states[-1]
            cos = nn.functional.cosine_similarity(first, last, dim=-1, eps=1e-8)
            distance[i + 1 - span] += float((1 - cos)[keep].sum())
            weights = keep.unsqueeze(-1).float()
            count = weights.sum(1).clamp_min(1)
            ratio = ((last.abs() * weights).sum(1) / count) / ((first.abs() * weights).sum(1) / count).clamp_min(1e-12)
            scale[i + 1 - span] += float(ratio.mean(-1).sum())
    distributed.all_sum(distance)  # data parallel: sums over every process's windows
    distributed.all_sum(scale)
    tokens, windows = distributed.all_sum_float(tokens), distributed.all_sum_float(windows)
    if not torch.isfinite(distance).all() or not torch.isfinite(scale).all():
        raise PrunelabError(
            "non-finite activations (NaN/inf) in the decoder blocks; the model's weights or inputs are broken"
        )
    return Survey(distance / max(tokens, 1), scale / max(windows, 1))


def _labelled_batches(model: nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor | None, batch_size: int):
    """(input ids, attention mask, labels with pads ignored) per batch, on the model's device."""
    device = next(model.parameters()).device
    for start in range(0, ids.shape[0], batch_size):
        x = ids[start : start + batch_size].to(device)
        mask = None if attention_mask is None else attention_mask[start : start + batch_size].to(device)
        yield x, mask, (x if mask is None else x.masked_fill(mask == 0, -100))


def language_model_loss(
    model: nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor | None, batch_size: int, backward: bool = False
) -> float:
    """Mean next-token loss over the calibration windows (pads excluded); with `backward`,
    gradients accumulate in whatever requires them, weighted as that mean (data parallel: this process's
    part of the mean over every process's windows; the caller sums the gradients)."""
    total, windows = 0.0, distributed.all_sum_float(ids.shape[0])
    for x, mask, labels in _labelled_batches(model, ids, attention_mask, batch_size):
        with torch.set_grad_enabled(backward):
            loss = model(input_ids=x, attention_mask=mask, labels=labels, use_cache=False).loss
            if backward:
                (loss * x.shape[0] / windows).backward()
        total += float(loss.detach()) * x.shape[0]
    return distributed.all_sum_float(total) / windows


class _Skip(StandIn):
    """A block skipped while the others run: returns its input."""

    def __init__(self, block: nn.Module, returns_tuple: bool):
        super().__init__(block)
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states, *args, **kwargs):
        return as_block_returns(hidden_states, self.returns_tuple)


class _Tap(StandIn):
    """The block itself, keeping its input (and seeing the form of its output)."""

    def forward(self, hidden_states, *args, **kwargs):
        self.seen = hidden_states
        output = self.block(hidden_states, *args, **kwargs)
        self.returns_tuple = isinstance(output, (tuple, list))
        return output


class _Replay(StandIn):
    """Stands for the first block and hands a stream computed earlier to the blocks after it."""

    def __init__(self, block: nn.Module, hidden: torch.Tensor, returns_tuple: bool):
        super().__init__(block)
        self.hidden, self.returns_tuple = hidden, returns_tuple

    def forward(self, hidden_states, *args, **kwargs):
        return as_block_returns(self.hidden, self.returns_tuple)


@torch.no_grad()
def skip_losses(
    model: nn.Module,
    blocks: nn.ModuleList,
    ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    batch_size: int,
    progress: bool = False,
) -> torch.Tensor:
    """For every block i, the mean next-token loss with block i skipped (pads excluded).

    Skipping block i feeds block i+1 the input of block i, so each batch runs once with every block's
    input kept, and then, per candidate, only the blocks after it and the model's own head: about half
    the work of running the whole model per candidate. Memory: one batch's input to every block."""
    count, windows = len(blocks), ids.shape[0]
    losses = torch.zeros(count, dtype=torch.float64)
    originals = list(blocks)
    bar = tqdm(
        total=-(-windows // batch_size) * count,
        desc="ppl metric: loss without each block",
        unit="block",
        leave=False,
        disable=not progress,
    )
    try:
        for x, mask, labels in _labelled_batches(model, ids, attention_mask, batch_size):
            for i, block in enumerate(originals):
                blocks[i] = _Tap(block)
            model(input_ids=x, attention_mask=mask, use_cache=False)
            inputs, returns_tuple = [tap.seen for tap in blocks], blocks[0].returns_tuple
            for i in range(count):
                blocks[0] = _Replay(originals[0], inputs[i], returns_tuple)
                for j in range(1, i + 1):
                    blocks[j] = _Skip(originals[j], returns_tuple)
                for j in range(i + 1, count):
                    blocks[j] = originals[j]
                loss = model(input_ids=x, attention_mask=mask, labels=labels, use_cache=False).loss
                losses[i] += float(loss) * x.shape[0]
                bar.update()
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
        bar.close()
    return distributed.all_sum(losses) / distributed.all_sum_float(windows)


def _weights(block: nn.Module) -> list[nn.Parameter]:
    """The block's weight matrices (fused expert tensors included); norms and biases are not scored."""
    return [p for p in block.parameters() if p.dim() >= 2]


def score_blocks(
    metric: str,
    model: nn.Module,
    adapter: Adapter,
    ids: torch.Tensor,
    attention_mask,
    batch_size: int,
    progress: bool = False,
) -> tuple[torch.Tensor, Survey | None]:
    """Importance of every block (lower = removed first), and the survey if one was taken."""
    blocks = adapter.blocks
    if metric == "bi":
        found = survey(model, adapter, ids, attention_mask, batch_size)
        return found.distance.clone(), found
    if metric == "mag":
        return torch.tensor([sum(float(w.detach().abs().sum()) for w in _weights(b)) for b in blocks]), None
    if metric == "taylor":
        requires = {p: p.requires_grad for p in model.parameters()}
        model.requires_grad_(False)
        weights = [_weights(b) for b in blocks]
        for w in (w for ws in weights for w in ws):
            w.requires_grad_(True)
            w.grad = None
        try:
            # one window per backward pass: the logits and their gradient take seqlen × vocab floats per
            # window (SmolLM2: 9.6 GB peak at 8 windows, 2.8 GB at 1, and faster), and the sum is the same
            language_model_loss(model, ids, attention_mask, 1, backward=True)
            distributed.all_sum_grads([w for ws in weights for w in ws])  # data parallel: every process's windows
            # a weight no token reached (an expert held as its own matrix) has no gradient: it scores nothing
            scores = torch.tensor([sum(float((w.detach() * w.grad).abs().sum()) for w in ws if w.grad is not None)
                                   for ws in weights])
        finally:
            for p, flag in requires.items():
                p.grad = None
                p.requires_grad_(flag)
        return scores, None
    if metric == "ppl":
        return skip_losses(model, blocks, ids, attention_mask, batch_size, progress), None
    raise PrunelabError(f"unknown depth metric {metric!r}; choose one of {', '.join(DEPTH_METRICS)}")


def head_shares_source(model: nn.Module, adapter: Adapter) -> bool:
    """Whether scaling the residual sources scales the LM head too: its weight is the input embedding's, and that
    embedding is a source (not so for Bloom, whose source is the norm after its embeddings)."""
    return tied_head(model) and any(m is model.get_input_embeddings() for m in adapter.residual_sources())


def untie_embeddings(model: nn.Module) -> None:
    """Give the LM head its own copy of tied input embeddings."""
    embed = model.get_input_embeddings().weight
    model.get_output_embeddings().weight = nn.Parameter(embed.detach().clone(), requires_grad=embed.requires_grad)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False


def prepare_head(model: nn.Module, adapter: Adapter) -> str:
    """How the LM head keeps its scale when the embeddings are rescaled: with tied embeddings, the
    final norm is scaled by 1/s each time (logits = sW · (g/s ⊙ x̂), exact and free); without a final
    norm the head is untied (a copy of the embedding matrix)."""
    if not head_shares_source(model, adapter):
        return ("tied, unscaled: the stream's source is a norm after the embeddings" if tied_head(model)
                else "separate head")
    if adapter.final_norm() is not None:
        return "tied: final norm counter-scaled"
    untie_embeddings(model)
    return "untied"


def fold_compensation(model: nn.Module, adapter: Adapter, before: int, s: float) -> None:
    """Multiply the residual stream entering block `before` by `s`: scale everything that writes it."""
    for module in adapter.residual_sources():
        scale_output(module, s)
    if head_shares_source(model, adapter):
        scale_output(adapter.final_norm(), 1 / s)
    for block in list(adapter.blocks)[:before]:
        for module in adapter.residual_writers(block):
            scale_output(module, s)


def remove_blocks(model: nn.Module, adapter: Adapter, indices: list[int]) -> None:
    """Delete blocks and keep the model consistent: layer indices (KV-cache slots) and every per-layer
    list of the config (layer types and the like) follow the remaining blocks."""
    blocks = adapter.blocks
    count = len(blocks)
    gone = set(indices)
    for i in sorted(gone, reverse=True):
        del blocks[i]
    for new_index, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        for key, value in list(vars(config).items()):
            if isinstance(value, (list, tuple)) and len(value) == count:
                setattr(config, key, type(value)(v for i, v in enumerate(value) if i not in gone))
        if getattr(config, "num_hidden_layers", None) == count:
            config.num_hidden_layers = len(blocks)


def check_depth(adapter: Adapter, config: RunConfig) -> None:
    """Refuse what cannot be done before anything is changed."""
    dc, count = config.depth, len(adapter.blocks)
    if dc.remove >= count:
        raise PrunelabError(f"cannot remove {dc.remove} of {count} blocks: at least one must remain")
    if dc.metric in ("taylor", "mag"):
        eligible = count - dc.protect_first - dc.protect_last
        if eligible < dc.remove:
            raise PrunelabError(
                f"{dc.metric} never removes the first {dc.protect_first} or last {dc.protect_last} blocks: "
                f"only {max(eligible, 0)} of {count} may go, {dc.remove} asked (lower depth.protect_first/last)"
            )
    if dc.compensation:
        adapter.residual_sources()
        for block in adapter.blocks:
            adapter.residual_writers(block)


def prune_depth(model: nn.Module, adapter: Adapter, ids: torch.Tensor | None, config: RunConfig,
                attention_mask: torch.Tensor | None = None, progress: bool = True) -> dict:
    """Remove `config.depth.remove` blocks in place; returns what was scored, removed and folded."""
    dc = config.depth
    check_depth(adapter, config)
    if ids is None and (dc.metric != "mag" or dc.compensation):
        raise PrunelabError(f"depth metric {dc.metric}{' with compensation' if dc.metric == 'mag' else ''} "
                            "needs calibration windows")
    origin = list(range(len(adapter.blocks)))  # original index of each remaining block
    report = {"metric": dc.metric, "compensation": dc.compensation, "one_shot": dc.one_shot or dc.metric == "cl",
              "blocks_before": len(origin), "head": prepare_head(model, adapter) if dc.compensation else None,
              "steps": []}
    removal = _remove_span if dc.metric == "cl" else _remove_in_rounds
    removal(model, adapter, ids, attention_mask, config, origin, report["steps"], progress)
    report["removed"] = sorted(set(range(report["blocks_before"])) - set(origin))
    report["kept"] = origin
    report["blocks_after"] = len(origin)
    return report


def _remove_span(model, adapter, ids, attention_mask, config, origin: list[int], steps: list, progress: bool) -> None:
    """CL: the contiguous span whose input and output agree most, removed at once."""
    dc = config.depth
    found = survey(model, adapter, ids, attention_mask, config.forward_batch, span=dc.remove)
    start = int(torch.argmin(found.distance))
    span = list(range(start, start + dc.remove))
    s = float(found.scale[start]) if dc.compensation else None
    if s is not None:
        fold_compensation(model, adapter, start, s)
    remove_blocks(model, adapter, span)
    steps.append({"scores": {f"{i}-{i + dc.remove - 1}": float(v) for i, v in enumerate(found.distance)},
                  "removed": [origin[i] for i in span], "scale": s})
    del origin[start:start + dc.remove]


class LoadedDepth:
    """The model in memory, as `_remove_in_rounds` scores, compensates and shortens it."""

    def __init__(self, model: nn.Module, adapter: Adapter, ids, attention_mask, batch: int, progress: bool):
        self.model, self.adapter, self.ids, self.mask, self.batch = model, adapter, ids, attention_mask, batch
        self.progress = progress

    def score(self, metric: str) -> tuple[torch.Tensor, Survey | None]:
        return score_blocks(metric, self.model, self.adapter, self.ids, self.mask, self.batch, self.progress)

    def survey(self) -> Survey:
        return survey(self.model, self.adapter, self.ids, self.mask, self.batch)

    def fold(self, position: int, s: float) -> None:
        fold_compensation(self.model, self.adapter, position, s)

    def remove(self, positions: list[int]) -> None:
        remove_blocks(self.model, self.adapter, positions)


def _remove_in_rounds(model, adapter, ids, attention_mask, config, origin: list[int], steps: list,
                      progress: bool) -> None:
    remove_in_rounds(LoadedDepth(model, adapter, ids, attention_mask, config.forward_batch, progress), config,
                     origin, steps, progress)


def remove_in_rounds(target, config: RunConfig, origin: list[int], steps: list, progress: bool) -> None:
    """Score, remove the least important block, fold its compensation, re-score (all at once with one_shot).
    `target`: the model in memory (`LoadedDepth`) or streamed (`depth_streamed.StreamedDepth`)."""
    dc = config.depth
    # Mag+ reads a block's own weights, which removing others leaves alone; the compensation folded
    # into earlier blocks' writers would inflate their scores without making them more important,
    # so the weights are scored once, as given (kept by dense block index)
    static = dict(zip(origin, target.score("mag")[0].tolist())) if dc.metric == "mag" else None
    rounds = 1 if dc.one_shot else dc.remove
    for _ in tqdm(range(rounds), desc=f"depth pruning ({dc.metric})", unit="round", disable=not progress):
        if static is not None:
            scores, found = torch.tensor([static[o] for o in origin]), None
        else:
            scores, found = target.score(dc.metric)
        ranked = scores.clone()
        if dc.metric in ("taylor", "mag"):
            ranked[:dc.protect_first] = float("inf")
            ranked[len(ranked) - dc.protect_last:] = float("inf")
        victims = sorted(torch.argsort(ranked)[:dc.remove if dc.one_shot else 1].tolist())
        scale = None
        if dc.compensation:
            scale = (found or target.survey()).scale
            for victim in victims:  # with one_shot, each fold also scales the other victims: harmless, they go
                target.fold(victim, float(scale[victim]))
        target.remove(victims)
        steps.append({"scores": {str(origin[i]): float(v) for i, v in enumerate(scores)},
                      "removed": [origin[i] for i in victims],
                      "scale": None if scale is None else [float(scale[i]) for i in victims]})
        for victim in reversed(victims):
            del origin[victim]
