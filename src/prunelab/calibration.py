"""Activations flowing through the decoder blocks during sequential calibration.

Only the current block's inputs are resident: `BlockStream.hidden` holds them for every
calibration window, and is overwritten in place by the block's outputs when the stream moves on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import greenlet
import torch
from torch import nn

from .errors import PrunelabError


class _Stop(Exception):
    """Raised by a hook to end a forward pass early once what it needs has been seen."""


class _Recorder(nn.Module):
    """Stands in for a decoder block: records the arguments it is called with, returns its input."""

    def __init__(self, block: nn.Module, index: int, sink: list, last: bool):
        super().__init__()
        self.block, self.index, self.sink, self.last = block, index, sink, last

    def __getattr__(self, name):  # model loops may read attributes of their layers
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.block, name)

    def forward(self, hidden_states, *args, **kwargs):
        self.sink.append((self.index, hidden_states, args, kwargs))
        if self.last:  # the final norm and LM head would only cost time and memory
            raise _Stop
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
        blocks[i] = _Recorder(block, i, sink, last=i == len(originals) - 1)
    hidden, block_args, token_masks = [], [[] for _ in originals], []
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start:start + batch_size].to(device)
            mask = None if attention_mask is None else attention_mask[start:start + batch_size].to(device)
            sink.clear()
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            except _Stop:
                pass
            seen = {index for index, *_ in sink}
            if seen != set(range(len(originals))):
                raise PrunelabError(f"the model's forward did not call every decoder block (called {sorted(seen)})")
            for index, h, args, kwargs in sink:
                if index == 0:
                    hidden.append(h.to(dtype))
                block_args[index].append((_cast(args, dtype), _cast(kwargs, dtype)))
            token_masks.append(None if mask is None or bool(mask.all()) else mask.bool())
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    return BlockStream(torch.cat(hidden), block_args, token_masks, batch_size)


def _cast(value, dtype: torch.dtype):
    """Floating tensors (position embeddings, additive masks) in the dtype the blocks compute in."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


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
    routed = has_routed_experts(block)

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


def has_routed_experts(block: nn.Module) -> bool:
    """Routing makes the sequence of linears a batch runs depend on its data."""
    return any(type(m).__name__ == "UnfusedExperts" for m in block.modules())


@torch.no_grad()
def prune_in_lockstep(block: nn.Module, linears: dict[str, nn.Linear], stream: BlockStream, index: int,
                      stats_cls, prune_layer: Callable[[str, Any], None]) -> None:
    """Statistics, pruning and propagation of one block in a single forward pass.

    Every calibration batch runs the block's own forward in a greenlet. At each linear layer a
    batch adds its input to the layer's statistics and pauses; once all batches wait at the same
    layer its statistics are complete, `prune_layer` prunes it, and the batches resume, so the
    layer computes with its pruned weights. Each matmul runs once, later layers see the outputs of
    already-pruned earlier ones ("true sequential"), and the block's outputs, written back into
    the stream, are the next block's inputs. It needs every batch to run the same sequence of
    linears, so blocks with routed experts use the two-pass path instead.
    """
    main = greenlet.getcurrent()
    stats: dict[str, Any] = {}
    leader_of: dict[str, str] = {}
    last_input: dict[Any, tuple[torch.Tensor, str]] = {}  # per batch: the input seen last, and its reader
    token_mask: dict[Any, torch.Tensor | None] = {}

    def hook_for(name: str):
        def hook(module, args):
            x, me = args[0], greenlet.getcurrent()
            last = last_input.get(me)
            if name not in leader_of:  # layers reading the very tensor the previous one read share statistics
                leader_of[name] = last[1] if last is not None and last[0] is x else name
            leader = leader_of[name]
            if leader == name:
                rows, mask = x.reshape(-1, x.shape[-1]), token_mask[me]
                if mask is not None and x.shape[:-1] == mask.shape:
                    rows = rows[mask.reshape(-1)]  # pad tokens carry no information
                if name not in stats:
                    stats[name] = stats_cls(x.shape[-1], x.device)
                stats[name].add(rows)
                last_input[me] = (x, name)
            main.switch(name)
        return hook

    def run_batch(rows: slice, args: tuple, kwargs: dict) -> None:
        token_mask[greenlet.getcurrent()] = stream.token_masks[rows.start // stream.batch_size]
        out = _output(block(stream.hidden[rows], *args, **kwargs))
        stream.hidden[rows] = out

    handles = [linear.register_forward_pre_hook(hook_for(name)) for name, linear in linears.items()]
    try:
        workers = [greenlet.greenlet(run_batch) for _ in stream.batches()]
        waiting = [worker.switch(rows, *stream.block_args[index][b]) for worker, (b, rows) in zip(workers, stream.batches())]
        while any(isinstance(w, str) for w in waiting):
            if len(set(waiting)) != 1:
                raise PrunelabError(f"block {index}: calibration batches ran different layers ({sorted(map(str, set(waiting)))})")
            name = waiting[0]
            st = stats[leader_of[name]]
            if not st.is_finite():
                raise PrunelabError(f"non-finite activations (NaN/inf) reach {name} of block {index}; "
                                    "the model's weights or inputs are broken")
            prune_layer(name, st)
            waiting = [worker.switch() for worker in workers]
    finally:
        for handle in handles:
            handle.remove()
    if not torch.isfinite(stream.hidden).all():
        raise PrunelabError(f"non-finite activations (NaN/inf) leave block {index}; the model's weights or inputs are broken")
