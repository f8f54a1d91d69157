"""Activations flowing through the decoder blocks: capture, streams, propagation, hooks on linears.

Only the current block's inputs are resident: `BlockStream.hidden` holds them for every
calibration window, and is overwritten in place by the block's outputs when the stream moves on.
Everything that runs a half-block over the calibration windows (to accumulate statistics, to keep a
linear's inputs, to propagate) lives here; what is done with the results lives in `prune/`,
`structured/` and `recover/`.
"""

from __future__ import annotations

import inspect
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import distributed
from .errors import PrunelabError
from .models.adapters import Adapter, Half, find_adapter, first_output


class Stop(Exception):
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


def as_block_returns(hidden: torch.Tensor, returns_tuple: bool):
    """`hidden` in the form the model's blocks return their output, for a stand-in in the model's own loop:
    Bloom's, Falcon's and MPT's blocks return a tuple, and their loops take its first item."""
    return (hidden,) if returns_tuple else hidden


class _Recorder(StandIn):
    """Records the arguments the block is called with and returns its input."""

    def __init__(self, block: nn.Module, index: int, sink: list, last: bool):
        super().__init__(block)
        self.index, self.sink, self.last = index, sink, last

    def forward(self, hidden_states, *args, **kwargs):
        if args:  # GPTBigCode passes its (absent) encoder states by position: recorded by name, called by name
            kwargs = named_arguments(self.block, hidden_states, args, kwargs)
        self.sink.append((self.index, hidden_states, kwargs))
        if self.last:  # the final norm and LM head would only cost time and memory
            raise Stop
        return hidden_states


def named_arguments(block: nn.Module, hidden_states, args: tuple, kwargs: dict) -> dict:
    """Every argument of a block call but the hidden states, by the name the block's forward gives it."""
    signature = inspect.signature(block.forward)
    try:
        bound = signature.bind(hidden_states, *args, **kwargs)
    except TypeError as error:
        raise PrunelabError(f"unsupported model: it calls its decoder blocks with arguments their forward does not "
                            f"take ({error})") from None
    named: dict = {}
    for name, value in list(bound.arguments.items())[1:]:
        kind = signature.parameters[name].kind
        if kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.VAR_POSITIONAL):
            raise PrunelabError(f"unsupported model: it passes its decoder blocks positional arguments that have no "
                                f"name ({type(block).__name__}.forward's {name})")
        named.update(value if kind is inspect.Parameter.VAR_KEYWORD else {name: value})
    return named


@dataclass
class BlockStream:
    hidden: torch.Tensor  # [windows, seqlen, hidden] inputs of the current block
    block_kwargs: list[list[dict[str, Any]]]  # [block][batch] -> keyword arguments the model passed
    token_masks: list[torch.Tensor | None]  # [batch] -> [b, seqlen] bool, False at pad tokens
    batch_size: int
    # [block] -> the keyword arguments' structure with, for each tensor, its rows per window (0: shared by all)
    window_rows: list | None = None

    def batches(self):
        for b, start in enumerate(range(0, self.hidden.shape[0], self.batch_size)):
            yield b, slice(start, start + self.batch_size)

    def arguments(self, block: int, batch: int, dtype: torch.dtype) -> dict[str, Any]:
        """The block's keyword arguments for a capture batch, their floating tensors (position embeddings,
        additive masks) in `dtype`: a block held in bfloat16 rotates float32 queries and keys by float32 angles,
        and attention refuses them beside its bfloat16 values."""
        return _cast(self.block_kwargs[block][batch], dtype)

    def alike(self, windows: list[int]) -> list[list[int]]:
        """`windows` in groups whose keyword arguments stack: the model passes no attention mask for a capture
        batch without padding and a mask for one with, which cannot be put together."""
        groups: dict[bool, list[int]] = {}
        for w in windows:
            groups.setdefault(self.token_masks[w // self.batch_size] is None, []).append(w)
        return list(groups.values())

    def with_hidden(self, hidden: torch.Tensor) -> BlockStream:
        """The same windows (arguments, pad masks) with other hidden states, e.g. a working copy."""
        return BlockStream(hidden, self.block_kwargs, self.token_masks, self.batch_size, self.window_rows)

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
        rows = None if self.window_rows is None else self.window_rows[block]
        return _select([self.block_kwargs[block][w // self.batch_size] for w in windows], picks, rows)

    def window_token_mask(self, windows: list[int]) -> torch.Tensor | None:
        """[len(windows), seqlen] bool, False at pad tokens; None when no window has padding."""
        masks = [self.token_masks[w // self.batch_size] for w in windows]
        if all(m is None for m in masks):
            return None
        seqlen = self.hidden.shape[1]
        return torch.stack([torch.ones(seqlen, dtype=torch.bool, device=self.hidden.device) if m is None
                            else m[w % self.batch_size] for m, w in zip(masks, windows)])


def _select(values: list, picks: list[tuple[int, int]], per_window=None):
    """Window `offset`'s rows of each value (one per window, from batches of `rows` windows), concatenated.

    `per_window` mirrors the values' structure: each tensor's rows per window, found by `_window_rows` (Bloom's
    alibi has one per head), or 0 where a tensor is shared by every window (MPT's per-head position bias).
    Where it is not known, a tensor is per window when its first dimension is its batch's size (and it has one
    beyond that); anything else (broadcast tensors, 1-D positions, flags) is taken from the first window.
    """
    first = values[0]
    if isinstance(first, torch.Tensor):
        k = per_window if isinstance(per_window, int) else None
        if k is None and all(v.dim() >= 2 and v.shape[0] == rows for v, (_, rows) in zip(values, picks)):
            k = 1
        if k:
            return torch.cat([v[offset * k:(offset + 1) * k] for v, (offset, _) in zip(values, picks)])
        return first
    if isinstance(first, (tuple, list)):
        inner = per_window if isinstance(per_window, (tuple, list)) else [None] * len(first)
        return type(first)(_select([v[i] for v in values], picks, inner[i]) for i in range(len(first)))
    if isinstance(first, dict):
        inner = per_window if isinstance(per_window, dict) else {}
        return {k: _select([v[k] for v in values], picks, inner.get(k)) for k in first}
    return first


def _window_rows(one, two):
    """Each tensor's rows per window, from the arguments of a call on one window and on two: a tensor that
    doubles is per window, one that does not is shared (0); None where the two calls' structures differ."""
    if isinstance(one, torch.Tensor) and isinstance(two, torch.Tensor):
        if one.dim() >= 1 and two.shape == (2 * one.shape[0], *one.shape[1:]):
            return one.shape[0]
        return 0 if one.shape == two.shape else None
    if isinstance(one, (tuple, list)) and isinstance(two, (tuple, list)) and len(one) == len(two):
        return type(one)(_window_rows(a, b) for a, b in zip(one, two))
    if isinstance(one, dict) and isinstance(two, dict):
        return {k: _window_rows(v, two.get(k)) for k, v in one.items()}
    return 0 if not isinstance(one, torch.Tensor) and not isinstance(two, torch.Tensor) else None


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor | None, batch_size: int, dtype: torch.dtype) -> BlockStream:
    """Run only the model's embedding and mask preparation, recording what each block receives.

    Every block is temporarily replaced by a recorder, so this costs no block computation, and the
    per-block arguments (position embeddings, per-layer-type masks) come from the model itself. Which of
    them hold rows per window is seen by recording one window, then that window twice (a padded one if
    any is, so that the masks take the form they take in the batches).
    """
    stream = _capture(model, blocks, input_ids, attention_mask, batch_size, dtype)
    if input_ids.shape[0] > 1:
        padded = [] if attention_mask is None else (~attention_mask.bool()).any(-1).nonzero().flatten().tolist()
        window = padded[:1] or [0]
        calls = [_capture(model, blocks, input_ids[window * n], None if attention_mask is None else
                          attention_mask[window * n], n, dtype).block_kwargs for n in (1, 2)]
        stream.window_rows = [_window_rows(one[0], two[0]) for one, two in zip(*calls)]
    return stream


def _capture(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
             batch_size: int, dtype: torch.dtype) -> BlockStream:
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
            except Stop:
                pass
            except Exception as error:
                if not sink:  # before the first block: the model's own error
                    raise
                what = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                raise PrunelabError(  # MVP indexes what its blocks return, which a stand-in cannot foresee
                    f"unsupported model: its forward failed after decoder block {sink[-1][0]} was recorded ({what}); "
                    "prunelab stands in for the blocks to record their inputs, and this model's loop does not take "
                    "what they return") from None
            seen = {index for index, *_ in sink}
            if seen != set(range(len(originals))):
                raise PrunelabError(f"the model's forward did not call every decoder block (called {sorted(seen)})")
            for index, h, kwargs in sink:
                if index == 0:
                    if hidden is None:
                        hidden = torch.empty((input_ids.shape[0], *h.shape[1:]), dtype=dtype, device=h.device)
                    hidden[start : start + h.shape[0]] = h
                block_kwargs[index].append(_cast(kwargs, dtype))
            token_masks.append(None if mask is None or bool(mask.all()) else mask.bool())
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    return BlockStream(hidden, block_kwargs, token_masks, batch_size)


def checked_adapter(model: nn.Module) -> Adapter:
    """The model's adapter, once its halves are seen to compute what the first block computes.

    The adapter is chosen from the module tree, which cannot show everything a block's forward does (a
    scale on the residual add, parallel branches, a mixing factor): such a family would otherwise be
    pruned and reconstructed against wrong activations without a word. 16 random tokens, before any work.
    """
    adapter = find_adapter(model)
    packed = {name: w for name, w in adapter.prunable_weights().items() if not _float_dtype(w.dtype)}
    if packed:  # a model quantized in memory (bitsandbytes, FP8 kept by its kernels): pruning would zero codes
        name, weight = next(iter(packed.items()))
        raise PrunelabError(f"{name} holds {str(weight.dtype).removeprefix('torch.')} weights "
                            f"({type(model.get_submodule(name.rpartition('.')[0])).__name__}): prunelab prunes float "
                            "weights; load the model unquantized or dequantized")
    was_training = model.training
    model.eval()  # no dropout
    try:
        stream = capture_block_inputs(model, adapter.blocks, probe_ids(model), None, batch_size=1,
                                      dtype=next(model.parameters()).dtype)
        check_halves(adapter, 0, stream)
    finally:
        model.train(was_training)
    return adapter


def _float_dtype(dtype: torch.dtype) -> bool:
    return dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def probe_ids(model: nn.Module) -> torch.Tensor:
    vocab = model.config.get_text_config().vocab_size
    return torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def check_halves(adapter: Adapter, index: int, stream: BlockStream) -> None:
    """Block `index` run whole and as its two halves on the stream's first batch: the same output, or a
    one-line refusal of the architecture."""
    block, kwargs = adapter.blocks[index], stream.block_kwargs[index][0]
    hidden = stream.hidden[:stream.batch_size]
    whole = first_output(block(hidden, **kwargs)).float()
    check_finite(whole, f"block {index}")  # broken weights: say so, not that the halves differ
    try:
        for half in adapter.halves(block):
            hidden = half(hidden, kwargs)
    except TypeError as error:  # the block calls its modules in a way the adapter does not (Bloom's residual)
        raise PrunelabError(f"unsupported architecture: the {adapter.family} adapter cannot call the parts of "
                            f"{type(block).__name__} as its forward does ({error})") from None
    with adapter.prunable_linears(block):  # refuses expert layouts it cannot split into linears
        pass
    error = ((hidden.float() - whole).norm() / whole.norm().clamp_min(1e-30)).item()
    if not error <= 1e-2:  # the same operations in the same order: equal but for a reordered add or two
        raise PrunelabError(f"unsupported architecture: the {adapter.family} adapter's attention and MLP halves do "
                            f"not compute what {type(block).__name__} computes (relative difference {error:.2g})")


@torch.no_grad()
def run_blocks(
    model: nn.Module,
    blocks: nn.ModuleList,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    batch_size: int,
):
    """Every calibration batch through every block in turn, without the LM head. Yields
    (block index, token mask of the batch or None, block input, block output), inputs in float32."""
    stream = capture_block_inputs(model, blocks, input_ids, attention_mask, batch_size, torch.float32)
    for b, rows in stream.batches():
        h = stream.hidden[rows]
        for i, block in enumerate(blocks):
            dtype = next(block.parameters()).dtype
            out = first_output(block(h.to(dtype), **stream.arguments(i, b, dtype))).float()
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


def token_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The input as [tokens, features], pad tokens left out where the input is per token: [batch, seqlen, features]
    or already flattened ([batch × seqlen, features]: OPT's fc1 and fc2)."""
    rows = x.reshape(-1, x.shape[-1])
    if mask is not None and rows.shape[0] == mask.numel():
        rows = rows[mask.reshape(-1)]
    return rows


def check_finite_stats(stats: dict[str, Any], index: int) -> None:
    for name, st in stats.items():
        if not st.is_finite():
            raise PrunelabError(
                f"non-finite activations (NaN/inf) reach {name} of block {index}; "
                "the model's weights or inputs are broken"
            )


def check_finite(output: torch.Tensor, where: str) -> None:
    """Called on each batch's outputs. A NaN or inf anywhere makes the float32 sum non-finite, and the sum
    needs no temporaries: `torch.isfinite(output).all()` took 20x longer (9.3 ms per 16 windows of
    SmolLM2) and, on a whole stream, +0.28 GB."""
    if not output.sum(dtype=torch.float32).isfinite():
        raise PrunelabError(f"non-finite activations (NaN/inf) leave {where}; the model's weights or inputs are broken")


@torch.no_grad()
def propagate(half: Half, stream: BlockStream, index: int) -> None:
    """Replace the stream's hidden states by the half's outputs, batch by batch, in place."""
    for b, rows in stream.batches():
        stream.hidden[rows] = half(stream.hidden[rows], stream.block_kwargs[index][b])
        check_finite(stream.hidden[rows], f"the {half.name} of block {index}")


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
                raise Stop

        return hook

    handles = [linears[n].register_forward_pre_hook(hook_for(n)) for n in linears]
    try:
        half.run(stream.hidden[: stream.batch_size], stream.block_kwargs[index][0])
    except Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    for name in linears:  # a linear the first batch never ran (an idle expert) stands alone
        leader_of.setdefault(name, name)
    return leader_of


@torch.no_grad()
def collect_statistics(
    half: Half, linears: dict[str, nn.Linear], stream: BlockStream, index: int, stats_cls, outputs: bool = False
) -> tuple[dict[str, Any], dict[str, str]]:
    """Run the half over the whole stream, accumulating `stats_cls` of every linear's input (and, with
    `outputs`, writing the half's outputs over the stream as `propagate` does).

    Used where routing decides which linears run (experts), so a pass cannot be stopped at one
    linear: all statistics come from the unpruned half, which is then pruned and propagated
    (two passes); and where every statistic of the unpruned model is wanted (OWL's outlier shares).
    Returns ({leader: stats}, {linear: leader}), leaders as in `share_inputs`.
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
                stats[name].add(token_rows(x, state["mask"]))
            state["last"] = (x, leader)

        return hook

    handles = [linears[n].register_forward_pre_hook(hook_for(n)) for n in linears]
    try:
        for b, rows in stream.batches():
            state["mask"] = stream.token_masks[b]
            h, kwargs = stream.hidden[rows], stream.block_kwargs[index][b]
            y = half.run(h, kwargs)
            state["last"] = (None, None)
            if outputs:
                stream.hidden[rows] = half.output(h, y, kwargs)
                check_finite(stream.hidden[rows], f"the {half.name} of block {index}")
    finally:
        for handle in handles:
            handle.remove()
    check_finite_stats(stats, index)
    # in the linears' order, not the order they first ran in: the order data parallel processes agree on (`agreed`)
    return stats, {name: leader_of.get(name, name) for name in linears}


def agreed(stats: dict, leader_of: dict[str, str], members: dict[str, nn.Linear], stats_cls) -> tuple[dict, dict]:
    """Data parallel: the groups and statistics `collect_statistics` found, the same in every process. Which experts
    a process's windows reach (and so which linears it found sharing an input) is its own; the statistics are summed
    over the processes one group at a time, so every process needs every group, in one order, even with no tokens."""
    if distributed.size() == 1:
        return stats, leader_of
    found = distributed.gathered(leader_of)
    leader_of = {name: next((f[name] for f in found if f[name] != name), name) for name in members}
    for leader in dict.fromkeys(leader_of.values()):
        if leader not in stats:  # reached by no window of this process
            stats[leader] = stats_cls(members[leader].in_features, members[leader].weight.device)
    return stats, leader_of


@torch.no_grad()
def linear_inputs(
    half: Half, linear: nn.Module, stream: BlockStream, index: int, stats=None, keep: Arena | None = None
) -> torch.Tensor | None:
    """Run every batch of `stream` through `half` up to `linear` and stop there.

    The inputs reaching `linear` are added to `stats` (pad tokens left out) and, with `keep`, kept
    for every window in one tensor allocated from that arena (returned). Earlier linears compute with
    whatever weights they have now, so a pass after pruning them sees pruned inputs.
    """
    kept: list[torch.Tensor] = []
    windows = stream.hidden.shape[0]

    def hook(module, args):
        x = args[0]
        if stats is not None:
            stats.add(token_rows(x, stream.token_masks[b]))
        if keep is not None:
            if not kept:
                kept.append(keep.empty((windows, *x.shape[1:]), x.dtype, x.device))
            kept[0][rows] = x
        raise Stop

    handle = linear.register_forward_pre_hook(hook)
    try:
        for b, rows in stream.batches():
            try:
                half.run(stream.hidden[rows], stream.block_kwargs[index][b])
            except Stop:
                continue
            raise PrunelabError(
                f"the {half.name} of block {index} returned without running one of its linears "
                f"({type(linear).__name__} {tuple(linear.weight.shape)})"
            )
    finally:
        handle.remove()
    return kept[0] if kept else None


class Arena:
    """Where cached activations live: ordinary memory, or memory-mapped files (unlinked at once,
    so nothing is left on disk whatever happens)."""

    def __init__(self, on_disk: bool = False, folder: str | None = None):
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


@torch.no_grad()
def run_halves(
    halves: list[Half], blocks: list[int], stream: BlockStream, out: torch.Tensor, name: str
) -> torch.Tensor:
    """The halves (of decoder blocks `blocks`, one index per half) applied in order to every window
    of `stream`, batch by batch, written to `out`; `name` says which submodel in errors."""
    for b, rows in stream.batches():
        h = stream.hidden[rows]
        for index, half in zip(blocks, halves):
            h = half(h, stream.block_kwargs[index][b])
        check_finite(h, name)
        out[rows] = h
    return out
