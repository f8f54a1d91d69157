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
from .models.adapters import Half, first_output


class _Stop(Exception):
    """Raised by a hook to end a forward pass early once what it needs has been seen."""


class StandIn(nn.Module):
    """Takes a decoder block's place in the model's block list for a while; attribute reads go to the block
    (model loops may read attributes of their layers)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.block, name)


class _Recorder(StandIn):
    """Records the arguments the block is called with and returns its input."""

    def __init__(self, block: nn.Module, index: int, sink: list, last: bool):
        super().__init__(block)
        self.index, self.sink, self.last = index, sink, last

    def forward(self, hidden_states, *args, **kwargs):
        self.sink.append((self.index, hidden_states, args, kwargs))
        if self.last:  # the final norm and LM head would only cost time and memory
            raise _Stop
        return hidden_states


@dataclass
class BlockStream:
    hidden: torch.Tensor  # [windows, seqlen, hidden] inputs of the current block
    block_kwargs: list[list[dict[str, Any]]]  # [block][batch] -> keyword arguments the model passed
    token_masks: list[torch.Tensor | None]  # [batch] -> [b, seqlen] bool, False at pad tokens
    batch_size: int

    def batches(self):
        for b, start in enumerate(range(0, self.hidden.shape[0], self.batch_size)):
            yield b, slice(start, start + self.batch_size)

    def with_hidden(self, hidden: torch.Tensor) -> BlockStream:
        """The same windows (arguments, pad masks) with other hidden states, e.g. a working copy."""
        return BlockStream(hidden, self.block_kwargs, self.token_masks, self.batch_size)

    def window_kwargs(self, block: int, windows: list[int]) -> dict[str, Any]:
        """The block's keyword arguments for any selection of windows, across capture batches.

        Per-window tensors (batch-sized first dimension: masks, position embeddings) are sliced
        and concatenated; broadcast ones are shared.
        """
        picks = []
        for w in windows:
            b, offset = divmod(w, self.batch_size)
            rows = min(self.batch_size, self.hidden.shape[0] - b * self.batch_size)
            picks.append((offset, rows))
        return _select([self.block_kwargs[block][w // self.batch_size] for w in windows], picks)

    def window_token_mask(self, windows: list[int]) -> torch.Tensor | None:
        """[len(windows), seqlen] bool, False at pad tokens; None when no window has padding."""
        masks = [self.token_masks[w // self.batch_size] for w in windows]
        if all(m is None for m in masks):
            return None
        seqlen = self.hidden.shape[1]
        return torch.stack([torch.ones(seqlen, dtype=torch.bool, device=self.hidden.device) if m is None
                            else m[w % self.batch_size] for m, w in zip(masks, windows)])


def _select(values: list, picks: list[tuple[int, int]]):
    """Row `offset` of each value (one per window, from batches of `rows` windows), concatenated.

    A tensor is per window when its first dimension is its batch's size (and it has one beyond
    that); anything else (broadcast tensors, 1-D positions, flags) is taken from the first window.
    """
    first = values[0]
    if isinstance(first, torch.Tensor):
        if all(v.dim() >= 2 and v.shape[0] == rows for v, (_, rows) in zip(values, picks)):
            return torch.cat([v[offset:offset + 1] for v, (offset, _) in zip(values, picks)])
        return first
    if isinstance(first, (tuple, list)):
        return type(first)(_select([v[i] for v in values], picks) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _select([v[k] for v in values], picks) for k in first}
    return first


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
    hidden: torch.Tensor | None = None
    block_kwargs, token_masks = [[] for _ in originals], []
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
                if args:
                    raise PrunelabError(f"unsupported model: it passes positional arguments to its decoder blocks ({len(args)})")
                if index == 0:
                    if hidden is None:
                        hidden = torch.empty((input_ids.shape[0], *h.shape[1:]), dtype=dtype, device=h.device)
                    hidden[start:start + h.shape[0]] = h
                block_kwargs[index].append(_cast(kwargs, dtype))
            token_masks.append(None if mask is None or bool(mask.all()) else mask.bool())
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    return BlockStream(hidden, block_kwargs, token_masks, batch_size)


@torch.no_grad()
def run_blocks(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               batch_size: int):
    """Every calibration batch through every block in turn, without the LM head. Yields
    (block index, token mask of the batch or None, block input, block output), inputs in float32."""
    stream = capture_block_inputs(model, blocks, input_ids, attention_mask, batch_size, torch.float32)
    for b, rows in stream.batches():
        h = stream.hidden[rows]
        for i, block in enumerate(blocks):
            out = first_output(block(h.to(next(block.parameters()).dtype), **stream.block_kwargs[i][b])).float()
            yield i, stream.token_masks[b], h, out
            h = out


def _cast(value, dtype: torch.dtype):
    """Floating tensors (position embeddings, additive masks) in the dtype the blocks compute in."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The input as [tokens, features], pad tokens left out where the input is per token."""
    rows = x.reshape(-1, x.shape[-1])
    if mask is not None and x.shape[:-1] == mask.shape:
        rows = rows[mask.reshape(-1)]
    return rows


def _check_finite(stats: dict[str, Any], index: int) -> None:
    for name, st in stats.items():
        if not st.is_finite():
            raise PrunelabError(f"non-finite activations (NaN/inf) reach {name} of block {index}; "
                                "the model's weights or inputs are broken")


def _check_stream_finite(stream: BlockStream, half: Half, index: int) -> None:
    if not torch.isfinite(stream.hidden).all():
        raise PrunelabError(f"non-finite activations (NaN/inf) leave the {half.name} of block {index}; "
                            "the model's weights or inputs are broken")


@torch.no_grad()
def propagate(half: Half, stream: BlockStream, index: int) -> None:
    """Replace the stream's hidden states by the half's outputs, batch by batch, in place."""
    for b, rows in stream.batches():
        stream.hidden[rows] = half(stream.hidden[rows], stream.block_kwargs[index][b])
    _check_stream_finite(stream, half, index)


@torch.no_grad()
def share_inputs(half: Half, linears: dict[str, nn.Linear], stream: BlockStream, index: int) -> dict[str, str]:
    """Which linears read the very same tensor (q/k/v, gate/up): {linear: the first of its group}.

    Found by running the half on the first batch; such groups share statistics and are pruned together.
    """
    leader_of: dict[str, str] = {}
    last: list = [None, None]  # the input seen last (kept alive, so its id stays unique) and its reader

    def hook_for(name: str):
        def hook(module, args):
            x = args[0]
            leader_of.setdefault(name, last[1] if last[0] is x else name)
            last[:] = [x, leader_of[name]]
            if module is half.writer:
                raise _Stop
        return hook

    handles = [linears[n].register_forward_pre_hook(hook_for(n)) for n in linears]
    try:
        half.run(stream.hidden[: stream.batch_size], stream.block_kwargs[index][0])
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    for name in linears:  # a linear the first batch never ran (an idle expert) stands alone
        leader_of.setdefault(name, name)
    return leader_of


@torch.no_grad()
def collect_statistics(half: Half, linears: dict[str, nn.Linear], stream: BlockStream, index: int,
                       stats_cls) -> tuple[dict[str, Any], dict[str, str]]:
    """Run the half over the whole stream, accumulating `stats_cls` of every linear's input.

    Used where routing decides which linears run (experts), so batches cannot advance in
    lockstep: all statistics come from the unpruned half, which is then pruned and propagated
    (two passes). Returns ({leader: stats}, {linear: leader}), leaders as in `share_inputs`.
    """
    stats: dict[str, Any] = {}
    leader_of: dict[str, str] = {}
    state: dict[str, Any] = {"mask": None, "last": (None, None)}

    def hook_for(name: str):
        def hook(module, args):
            x = args[0]
            last_x, last_reader = state["last"]
            leader = leader_of.setdefault(name, last_reader if last_x is x else name)
            if leader == name:
                if name not in stats:
                    stats[name] = stats_cls(x.shape[-1], x.device)
                stats[name].add(_rows(x, state["mask"]))
            state["last"] = (x, leader)
        return hook

    handles = [linears[n].register_forward_pre_hook(hook_for(n)) for n in linears]
    try:
        for b, rows in stream.batches():
            state["mask"] = stream.token_masks[b]
            half.run(stream.hidden[rows], stream.block_kwargs[index][b])
            state["last"] = (None, None)
    finally:
        for handle in handles:
            handle.remove()
    _check_finite(stats, index)
    for name in linears:
        leader_of.setdefault(name, name)
    return stats, leader_of


@torch.no_grad()
def prune_half_in_lockstep(half: Half, linears: dict[str, nn.Linear], stream: BlockStream, index: int, stats_cls,
                           leader_of: dict[str, str], prune_group: Callable[[list[str], Any], None],
                           need_output: bool = True) -> None:
    """Statistics, pruning and propagation of one half-block in a single forward pass.

    Every calibration batch runs the half in a greenlet. At the first linear of each group a batch
    adds its input to the group's statistics and pauses; once all batches wait there, the
    statistics are complete, `prune_group` prunes the group, and the batches resume, so it
    computes with its pruned weights and later linears see pruned inputs ("true sequential").
    At the residual-writing linear (o_proj, down_proj) each batch leaves its input and stops,
    which frees everything else the batch held; once that linear is pruned it is applied to the
    kept inputs and the results are added to the residual stream. Each matmul runs once.
    """
    main = greenlet.getcurrent()
    writer = next(n for n, m in linears.items() if m is half.writer)
    stop_at = leader_of[writer]
    stats: dict[str, Any] = {}
    # Inputs of the writer for all windows, in one block of memory: kept per batch, the many
    # freed smaller tensors around them fragment the heap and raise peak memory by hundreds of MB.
    writer_inputs: list[torch.Tensor | None] = [None]
    windows = stream.hidden.shape[0]
    batch_of: dict[Any, tuple[int, slice]] = {}

    def keep_writer_input(x: torch.Tensor, rows: slice) -> None:
        count = min(rows.stop, windows) - rows.start
        per_window = x.shape[0] // count
        if writer_inputs[0] is None:
            writer_inputs[0] = torch.empty((windows * per_window, *x.shape[1:]), dtype=x.dtype, device=x.device)
        writer_inputs[0][rows.start * per_window: rows.start * per_window + x.shape[0]] = x

    def writer_input(rows: slice) -> torch.Tensor:
        per_window = writer_inputs[0].shape[0] // windows
        return writer_inputs[0][rows.start * per_window: min(rows.stop, windows) * per_window]

    def hook_for(name: str):
        def hook(module, args):
            if leader_of[name] != name:
                return  # pruned with its leader, which read the same tensor
            x, (b, rows) = args[0], batch_of[greenlet.getcurrent()]
            if name not in stats:
                stats[name] = stats_cls(x.shape[-1], x.device)
            stats[name].add(_rows(x, stream.token_masks[b]))
            if name == stop_at:
                keep_writer_input(x, rows)
                raise _Stop
            main.switch(name)
        return hook

    def run_batch(b: int, rows: slice) -> str:
        batch_of[greenlet.getcurrent()] = (b, rows)
        try:
            half.run(stream.hidden[rows], stream.block_kwargs[index][b])
        except _Stop:
            return "stopped"
        raise PrunelabError(f"the {half.name} of block {index} returned without running its output projection {writer}")

    def prune(name: str) -> None:
        _check_finite({name: stats[name]}, index)
        prune_group([n for n in linears if leader_of[n] == name], stats[name])

    handles = [linears[n].register_forward_pre_hook(hook_for(n)) for n in linears]
    try:
        workers = [greenlet.greenlet(run_batch) for _ in stream.batches()]
        waiting = [worker.switch(b, rows) for worker, (b, rows) in zip(workers, stream.batches())]
        while waiting[0] != "stopped":
            if len(set(waiting)) != 1:
                raise PrunelabError(f"block {index}: calibration batches ran different layers ({sorted(set(waiting))})")
            prune(waiting[0])
            waiting = [worker.switch() for worker in workers]
    finally:
        for handle in handles:
            handle.remove()
    prune(stop_at)
    if need_output:
        for _, rows in stream.batches():
            stream.hidden[rows] = half.finish(stream.hidden[rows], half.writer(writer_input(rows)))
    writer_inputs.clear()
    if need_output:
        _check_stream_finite(stream, half, index)
