"""Width pruning with FLAP (An et al., AAAI 2024; docs/DESIGN.md): remove attention heads and MLP channels,
physically.

For the writer W (o_proj, down_proj) of each half-block and its input x over the calibration tokens:

    score_c = Var_t(x_c) · ‖W[:, c]‖²                 (fluctuation-weighted importance of channel c)
    ẑ_c    = (score_c − mean) / std                  (standardised within the layer)
    unit score = mean ẑ over the unit's channels     (unit: one MLP channel, or one KV group of
                                                      attention heads with its query heads)

adaptive  remove the lowest-scoring units across all layers and both kinds, counting each unit's
          parameters, until `ratio` of the attention and MLP parameters is gone
uniform   remove `ratio` of the units of every layer

Bias compensation keeps the writer's expected output: b ← b + W[:, removed] · E[x_removed]
(a bias is added where the architecture had none). Every layer keeps at least one unit.
Whole KV groups go together, so every layer keeps the model's query-per-KV-head ratio.

A model larger than memory (`prune_width_streamed`) takes two passes over its blocks, one in memory at a
time: the first gathers every layer's moments and column norms, the units are chosen over all layers,
and the second narrows each block and hands it to be written.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..activations import BlockStream, capture_block_inputs, run_blocks, token_rows
from ..config import RunConfig
from ..errors import PrunelabError
from ..models.adapters import Adapter, Width, first_output
from ..models.conv1d import linear_class


@dataclass
class Moments:
    """Running mean and variance of each input channel of a writer, over calibration tokens."""

    total: torch.Tensor
    squares: torch.Tensor
    count: int = 0

    @classmethod
    def of(cls, width: int) -> Moments:
        return cls(torch.zeros(width, dtype=torch.float64), torch.zeros(width, dtype=torch.float64))

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        self.total += x.sum(0).cpu()
        self.squares += x.pow(2).sum(0).cpu()
        self.count += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    @property
    def variance(self) -> torch.Tensor:
        return (self.squares - self.count * self.mean.pow(2)).clamp_min(0) / max(self.count - 1, 1)


@dataclass
class Layer:
    """One half-block's prunable units: groups of writer input channels."""

    block: int
    width: Width
    moments: Moments
    columns: torch.Tensor | None = None  # ‖W[:, c]‖² of the writer, taken while its weights are in memory
    scores: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    removed: list[int] = field(default_factory=list)  # unit indices

    @property
    def name(self) -> str:
        return f"block {self.block} {self.width.half}"

    @property
    def units(self) -> list[list[int]]:
        return self.width.units

    @property
    def writer(self) -> nn.Linear:
        return self.width.linear(self.width.writer)

    @property
    def unit_params(self) -> int:
        """Parameters one unit carries: its rows of every reader (with biases) and its writer columns."""
        w = self.width
        rows = sum(len(w.readers[name][0]) * (w.linear(name).in_features + (w.linear(name).bias is not None))
                   for name in w.readers)
        return rows + len(w.units[0]) * self.writer.out_features


def flap_layers(adapter: Adapter) -> list[Layer]:
    return [layer for i, block in enumerate(adapter.blocks) for layer in block_layers(adapter, i, block)]


def block_layers(adapter: Adapter, index: int, block: nn.Module) -> list[Layer]:
    return [Layer(index, width, Moments.of(width.linear(width.writer).in_features)) for width in adapter.widths(block)]


@contextmanager
def writer_inputs(layers: list[Layer]):
    """Within: what each layer's writer saw in its last call, by layer position; afterwards the writers' column
    norms are taken (while their weights are in memory)."""
    seen: dict[int, torch.Tensor] = {}

    def hook(n: int):
        def record(module, args):
            seen[n] = args[0]
        return record

    handles = [layer.writer.register_forward_pre_hook(hook(n)) for n, layer in enumerate(layers)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()
    for layer in layers:
        layer.columns = column_norms(layer)


@torch.no_grad()
def collect(model: nn.Module, adapter: Adapter, layers: list[Layer], ids: torch.Tensor,
            attention_mask: torch.Tensor | None, batch_size: int, progress: bool) -> None:
    """Moments of every writer's input over the calibration tokens of the dense model (pads excluded).
    The blocks run one after another on captured inputs: the LM head's logits are never computed."""
    steps = -(-ids.shape[0] // batch_size) * len(adapter.blocks)
    with writer_inputs(layers) as seen:
        # the batch's pad mask arrives with the block's output, so the moments are taken then
        for _, mask, _, _ in tqdm(run_blocks(model, adapter.blocks, ids, attention_mask, batch_size), total=steps,
                                  desc="FLAP statistics", unit="block", disable=not progress):
            for n, x in seen.items():
                layers[n].moments.add(token_rows(x, mask))
            seen.clear()
    reduce_moments(layers)


def column_norms(layer: Layer) -> torch.Tensor:
    return layer.writer.weight.detach().double().pow(2).sum(0).cpu()


def reduce_moments(layers: list[Layer]) -> None:
    """Data parallel: every process's windows in one set of moments; then check them."""
    for layer in layers:
        moments = layer.moments
        distributed.all_sum(moments.total)
        distributed.all_sum(moments.squares)
        moments.count = round(distributed.all_sum_float(moments.count))
        if not torch.isfinite(moments.squares).all():
            raise PrunelabError(f"non-finite activations (NaN/inf) enter {layer.name}'s output projection")


def score(layers: list[Layer]) -> None:
    """Fluctuation × squared column norm per channel, standardised per layer, averaged per unit."""
    for layer in layers:
        channel = layer.moments.variance * layer.columns
        z = (channel - channel.mean()) / channel.std().clamp_min(1e-12)
        layer.scores = torch.stack([z[unit].mean() for unit in layer.units])


def choose(layers: list[Layer], ratio: float, structure: str) -> None:
    """Which units go (see the module docstring); every layer keeps at least one."""
    if structure == "uniform":
        for layer in layers:
            count = min(round(ratio * len(layer.units)), len(layer.units) - 1)
            layer.removed = sorted(torch.argsort(layer.scores)[:count].tolist())
        return
    budget = ratio * sum(len(layer.units) * layer.unit_params for layer in layers)
    candidates = sorted((float(s), n, u) for n, layer in enumerate(layers) for u, s in enumerate(layer.scores))
    left = [len(layer.units) for layer in layers]
    removed = 0
    for _, n, u in candidates:
        if removed >= budget:
            break
        if left[n] == 1:
            continue
        layers[n].removed.append(u)
        left[n] -= 1
        removed += layers[n].unit_params
    for layer in layers:
        layer.removed.sort()


def _slice(linear: nn.Linear, rows: list[int] | None = None, cols: list[int] | None = None,
           bias: torch.Tensor | None = None) -> nn.Linear:
    weight = linear.weight.detach()
    if rows is not None:
        weight = weight[rows]
    if cols is not None:
        weight = weight[:, cols]
    if bias is None and linear.bias is not None:
        bias = linear.bias.detach() if rows is None else linear.bias.detach()[rows]
    out = linear_class(linear)(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                               dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out


def unit_changes(width: Width, removed: list[int]) -> dict[str, tuple[list[int] | None, list[int] | None]]:
    """(rows kept, columns kept) of each linear of `width` once the units `removed` go: rows of the readers
    (with the rows no unit owns; ascending, so a fused reader such as gate_up_proj keeps its parts one after the
    other), columns of the writer; None where all are kept."""
    gone = set(removed)
    keep = [u for u in range(len(width.units)) if u not in gone]
    changes = {name: (sorted([r for u in keep for r in rows[u]] + width.shared.get(name, [])), None)
               for name, rows in width.readers.items()}
    changes[width.writer] = (None, [c for u in keep for c in width.units[u]])
    return changes


@contextmanager
def _zeroed(width: Width, changes: dict[str, tuple[list[int] | None, list[int] | None]]):
    """Within: the rows (and bias entries) and columns of `width`'s linears that `changes` does not keep are
    zero, in place; the values are put back after (only they are copied: the check costs no copy of a layer)."""
    saved = []
    try:
        for name, (rows, cols) in changes.items():
            linear = width.linear(name)
            for tensor, dim, kept in ((linear.weight, 0, rows), (linear.bias, 0, rows), (linear.weight, 1, cols)):
                if kept is not None and tensor is not None:
                    gone = torch.ones(tensor.shape[dim], dtype=torch.bool, device=tensor.device)
                    gone[kept] = False
                    index = gone.nonzero().flatten()
                    saved.append((tensor, dim, index, tensor.index_select(dim, index)))
                    tensor.index_fill_(dim, index, 0)
        yield
    finally:
        for tensor, dim, index, values in reversed(saved):
            tensor.index_copy_(dim, index, values)


@contextmanager
def _narrowed(adapter: Adapter, block: nn.Module, width: Width,
              changes: dict[str, tuple[list[int] | None, list[int] | None]]):
    """Within: `width`'s linears replaced by their narrowed copies and the block's counts set to match; the
    very modules it held, and its counts, after."""
    swapped = []
    try:
        for name, (rows, cols) in changes.items():
            old = width.linear(name)
            setattr(width.module, name, _slice(old, rows, cols))
            swapped.append((name, old))
        adapter.recount(block)
        yield
    finally:
        for name, old in reversed(swapped):
            setattr(width.module, name, old)
        adapter.recount(block)


def _counts(block: nn.Module) -> dict[str, object]:
    """What `recount` may set in the block: every int attribute of its modules, and their configs."""
    found: dict[str, object] = {}
    for path, module in block.named_modules():
        for key, value in vars(module).items():
            if (isinstance(value, int) and not isinstance(value, bool)) or key == "config":
                found[f"{path}.{key}" if path else key] = value
    return found


def _restore_counts(block: nn.Module, counts: dict[str, object]) -> None:
    modules = dict(block.named_modules())
    for name, value in counts.items():
        path, _, key = name.rpartition(".")
        setattr(modules[path], key, value)


@torch.no_grad()
def check_width(adapter: Adapter, stream: BlockStream) -> None:
    """Refuse in one line, before any work, a block whose units the adapter places wrongly or whose forward
    does not follow narrowed shapes. Block 0, on the stream's first batch (the probe's tokens), with the last
    unit of a half removed must compute what it computes with that unit's rows and columns zeroed (which makes
    its output owe nothing to the unit), half by half. Where a fused projection's heads lie, and which counts its
    forward splits them by, the module tree tells only by rules (`adapters._fused_order`, `Adapter.recount`):
    this is their proof on the model at hand. It holds one half's narrowed copy at a time."""
    block, kwargs = adapter.blocks[0], stream.block_kwargs[0][0]
    hidden = stream.hidden[:stream.batch_size]

    def change() -> torch.Tensor:
        return (first_output(block(hidden, **kwargs)) - hidden).float()

    counts = _counts(block)
    adapter.recount(block)  # the dense block's shapes give its own counts back, or the rules misread them
    recounted = _counts(block)
    if recounted != counts:
        moved = next(name for name, value in recounted.items() if counts.get(name) != value)
        _restore_counts(block, counts)
        raise PrunelabError(f"width pruning is not supported for {type(block).__name__}: the head counts it would set "
                            f"from the shapes differ from the model's own ({moved})")

    for width in adapter.widths(block):
        if len(width.units) < 2:  # every layer keeps a unit
            continue
        changes = unit_changes(width, [len(width.units) - 1])
        with _zeroed(width, changes):
            expected = change()
        try:
            with _narrowed(adapter, block, width, changes):
                error = ((change() - expected).norm() / expected.norm().clamp_min(1e-30)).item()
            detail = f"relative difference {error:.2g}"
        except Exception as exc:  # noqa: BLE001 (a forward meeting shapes it was not built for fails in any way)
            error, detail = float("inf"), f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if not error <= 1e-2:  # (the same sums but for zero terms: equal to rounding)
            raise PrunelabError(f"width pruning is not supported for {type(block).__name__}: with a {width.unit} "
                                f"removed its {width.half} does not compute what it computes with the {width.unit} "
                                f"zeroed ({detail})")


def apply(layers: list[Layer], compensate: bool, prefix: str) -> dict[str, dict]:
    """Physically remove the chosen units; returns, per replaced linear (by state-dict name), the kept
    rows/columns."""
    record = {}
    for layer in layers:
        if not layer.removed:
            continue
        dropped = [c for u in layer.removed for c in layer.units[u]]
        writer = layer.writer
        bias = writer.bias.detach().clone() if writer.bias is not None else None
        if compensate:
            mean = layer.moments.mean[dropped].to(writer.weight.dtype).to(writer.weight.device)
            shift = writer.weight.detach()[:, dropped] @ mean
            bias = shift if bias is None else bias + shift
        width = layer.width
        for name, (rows, cols) in unit_changes(width, layer.removed).items():
            old = width.linear(name)
            new = _slice(old, rows, cols, bias if old is writer else None)
            setattr(width.module, name, new)
            record[".".join(p for p in (prefix, str(layer.block), width.path, name) if p)] = {  # OPT's MLP: no path
                "rows": rows, "cols": cols, "dense_shape": list(old.weight.shape), "bias": new.bias is not None}
    return record


def prune_width(model: nn.Module, adapter: Adapter, ids: torch.Tensor, config: RunConfig,
                attention_mask: torch.Tensor | None = None, progress: bool = True) -> dict:
    """FLAP in place; returns the report (units kept per layer) with the reload record under "linears"."""
    wc = config.width
    layers = flap_layers(adapter)
    collect(model, adapter, layers, ids, attention_mask, config.forward_batch, progress)
    score(layers)
    choose(layers, wc.ratio, wc.structure)
    linears = apply(layers, wc.bias_compensation, adapter.blocks_prefix)
    for block in adapter.blocks:
        adapter.recount(block)
    return width_report(config, layers, linears)


def prune_width_streamed(visits, ids: torch.Tensor, config: RunConfig, progress: bool = True) -> dict:
    """FLAP of a model larger than memory (`visits`: streaming.StreamedPruning, which loads a block, and
    writes and drops it): the statistics pass, the choice over all layers, then the narrowing pass."""
    streamed, wc = visits.streamed, config.width
    blocks = streamed.adapter.blocks
    with torch.no_grad():
        with streamed.outer("input") as model:
            stream = capture_block_inputs(model, blocks, ids, None, config.forward_batch, torch.float32)
        layers = []
        for index in tqdm(range(len(blocks)), desc="FLAP statistics", unit="block", disable=not progress):
            block = streamed.load_block(index)
            found = block_layers(streamed.adapter, index, block)
            with writer_inputs(found) as seen:
                for b, rows in stream.batches():
                    x = stream.hidden[rows].to(streamed.compute_dtype)
                    stream.hidden[rows] = first_output(block(x, **stream.arguments(index, b, x.dtype))).float()
                    for n, x in seen.items():
                        found[n].moments.add(x)
                    seen.clear()
            streamed.drop_block(index)
            layers += found
        del stream
    reduce_moments(layers)
    score(layers)
    choose(layers, wc.ratio, wc.structure)
    linears = {}
    for index in tqdm(range(len(blocks)), desc="FLAP narrowing", unit="block", disable=not progress):
        visits.enter(index)
        linears.update(apply([layer for layer in layers if layer.block == index], wc.bias_compensation,
                             streamed.prefix))
        streamed.adapter.recount(blocks[index])
        visits.leave(index)
    return width_report(config, layers, linears)


def width_report(config: RunConfig, layers: list[Layer], linears: dict[str, dict]) -> dict:
    wc = config.width
    return {
        "ratio": wc.ratio, "structure": wc.structure, "bias_compensation": wc.bias_compensation,
        "layers": [{"layer": layer.name, "units": len(layer.units), "removed": len(layer.removed),
                    "unit": layer.width.unit} for layer in layers],
        "linears": linears,
    }
