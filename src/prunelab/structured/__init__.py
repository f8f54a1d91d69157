"""Structured pruning: whole blocks (depth, Prune&Comp) and heads/channels (width, FLAP)."""

from __future__ import annotations

import torch
from torch import nn

from ..activations import capture_block_inputs, probe_ids
from ..config import RunConfig
from ..models.adapters import Adapter
from .depth import check_depth, prune_depth
from .depth_streamed import prune_depth_streamed
from .width import check_width, prune_width, prune_width_streamed


def check_structured(adapter: Adapter, config: RunConfig) -> None:
    """Refuse what the method cannot do to this model before any work (the blocks may be on the meta device)."""
    if config.method == "layers":
        check_depth(adapter, config)
    elif config.method == "flap":
        for block in adapter.blocks:
            adapter.widths(block)
        weight = next(adapter.blocks[0].parameters())
        if not weight.is_meta:  # (streamed: `StreamedModel.check_adapter` runs it with block 0 read)
            model = adapter.model
            check_width(adapter, capture_block_inputs(model, adapter.blocks, probe_ids(model), None, 1, weight.dtype))


def prune_structured(model: nn.Module, adapter: Adapter, ids: torch.Tensor | None, config: RunConfig,
                     attention_mask: torch.Tensor | None = None, progress: bool = True) -> dict:
    """Layer removal (`method: layers`) or FLAP (`method: flap`) in place; returns the method's report."""
    prune = prune_depth if config.method == "layers" else prune_width
    return prune(model, adapter, ids, config, attention_mask=attention_mask, progress=progress)


__all__ = [
    "check_structured", "check_width", "prune_depth", "prune_depth_streamed", "prune_structured", "prune_width",
    "prune_width_streamed",
]
