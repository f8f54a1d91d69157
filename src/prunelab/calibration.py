"""Activations flowing through the decoder blocks during sequential calibration.

Only the current block's inputs are resident: `BlockStream.hidden` holds them for every
calibration window, and is overwritten in place by the block's outputs when the stream moves on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import PrunelabError


class _Stop(Exception):
    """Raised by a hook to end a forward pass early once what it needs has been seen."""


class _Recorder(nn.Module):
    """Stands in for a decoder block: records the arguments it is called with, returns its input."""

    def __init__(self, block: nn.Module, index: int, sink: list):
        super().__init__()
        self.block, self.index, self.sink = block, index, sink

    def __getattr__(self, name):  # model loops may read attributes of their layers
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.block, name)

    def forward(self, hidden_states, *args, **kwargs):
        self.sink.append((self.index, hidden_states, args, kwargs))
        return hidden_states


@dataclass
class BlockStream:
    hidden: torch.Tensor  # [windows, seqlen, hidden] inputs of the current block
    block_args: list[list[tuple[tuple, dict[str, Any]]]]  # [block][batch] -> (args, kwargs)
    token_masks: list[torch.Tensor | None]  # [batch] -> [b, seqlen] bool, False at pad tokens
    batch_size: int

    def batches(self):
        for b, start in enumerate(range(0, self.hidden.shape[0], self.batch_size)):
            yield b, slice(start, start + self.batch_size)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor | None, batch_size: int, dtype: torch.dtype) -> BlockStream:
    """Run only the model's embedding and mask preparation, recording what each block receives.

    Every block is temporarily replaced by a recorder, so this costs no block computation, and the
    per-block arguments (position embeddings, per-layer-type masks) come from the model itself.
    """
    device = next(model.parameters()).device
    originals = list(blocks)
    sink: list = []
    for i, block in enumerate(originals):
        blocks[i] = _Recorder(block, i, sink)
    hidden, block_args, token_masks = [], [[] for _ in originals], []
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start:start + batch_size].to(device)
            mask = None if attention_mask is None else attention_mask[start:start + batch_size].to(device)
            sink.clear()
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            seen = {index for index, *_ in sink}
            if seen != set(range(len(originals))):
                raise PrunelabError(f"the model's forward did not call every decoder block (called {sorted(seen)})")
            for index, h, args, kwargs in sink:
                if index == 0:
                    hidden.append(h.to(dtype))
                block_args[index].append((args, kwargs))
            token_masks.append(None if mask is None or bool(mask.all()) else mask.bool())
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    return BlockStream(torch.cat(hidden), block_args, token_masks, batch_size)


def _output(result) -> torch.Tensor:
    return result[0] if isinstance(result, (tuple, list)) else result


@torch.no_grad()
def propagate(block: nn.Module, stream: BlockStream, index: int, name: str) -> None:
    """Replace the stream's hidden states by `block`'s outputs, batch by batch, in place."""
    for b, rows in stream.batches():
        args, kwargs = stream.block_args[index][b]
        out = _output(block(stream.hidden[rows], *args, **kwargs))
        stream.hidden[rows] = out
    if not torch.isfinite(stream.hidden).all():
        raise PrunelabError(f"non-finite activations (NaN/inf) leave {name}; the model's weights or inputs are broken")


@torch.no_grad()
def collect_statistics(block: nn.Module, linears: dict[str, nn.Linear], stream: BlockStream, index: int,
                       stats_cls) -> tuple[dict[str, Any], dict[str, str]]:
    """Run the block over the stream, accumulating `stats_cls` of every linear's inputs.

    Linears that read the very same input tensor (q/k/v, gate/up) share one statistics object;
    returns ({leader: stats}, {linear: leader}). Once the first batch has shown the call order, the
    pass stops at the last linear's input: the block's output is not needed here. Blocks with
    routed experts run to the end, since routing changes which linear comes last.
    """
    stats: dict[str, Any] = {}
    leader_of: dict[str, str] = {}
    order: list[str] = []
    seen_inputs: dict[int, tuple[torch.Tensor, str]] = {}  # keeps inputs alive so ids stay unique
    state = {"mask": None, "stop_after": None}
    routed = any(type(m).__name__ == "UnfusedExperts" for m in block.modules())

    def hook_for(name: str):
        def hook(module, args):
            x = args[0]
            if id(x) in seen_inputs:
                leader_of.setdefault(name, seen_inputs[id(x)][1])
            else:
                seen_inputs[id(x)] = (x, name)
                leader_of.setdefault(name, name)
            if name not in order:
                order.append(name)
            if leader_of[name] == name:
                rows = x.reshape(-1, x.shape[-1])
                mask = state["mask"]
                if mask is not None and x.shape[:-1] == mask.shape:
                    rows = rows[mask.reshape(-1)]  # pad tokens carry no information
                if name not in stats:
                    stats[name] = stats_cls(x.shape[-1], x.device)
                stats[name].add(rows)
            if name == state["stop_after"]:
                raise _Stop
        return hook

    handles = [linear.register_forward_pre_hook(hook_for(name)) for name, linear in linears.items()]
    try:
        for b, rows in stream.batches():
            args, kwargs = stream.block_args[index][b]
            state["mask"] = stream.token_masks[b]
            try:
                block(stream.hidden[rows], *args, **kwargs)
            except _Stop:
                pass
            seen_inputs.clear()
            if b == 0 and not routed and order:
                state["stop_after"] = order[-1]
    finally:
        for handle in handles:
            handle.remove()
    for name, st in stats.items():
        if not st.is_finite():
            raise PrunelabError(f"non-finite activations (NaN/inf) reach {name} of block {index}; "
                                "the model's weights or inputs are broken")
    return stats, leader_of
