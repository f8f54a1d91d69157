"""A checkpoint's own tensor layout against the one the model holds.

transformers 5 converts some tensors when it loads a checkpoint and converts them back when it saves one:
a Mixture-of-Experts checkpoint stores one matrix per expert and projection (`experts.0.w1.weight`, ...), the
model holds one fused tensor per projection pair (`experts.gate_up_proj`, E x 2I x H). A model loaded whole
goes through both on its own. A streamed model reads and writes one block at a time, so it applies the same
conversions to that block's tensors, with transformers' own conversion mapping for the model.
"""

from __future__ import annotations

from copy import deepcopy

import torch
from torch import nn


def to_stored(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` (by the model's names) in the checkpoint's layout, as `save_pretrained` writes them."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without conversions saves the names it holds
        return dict(tensors)
    return revert_weight_conversion(model, dict(tensors))


def stored_names(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """The keys each tensor is saved under (meta tensors will do: only the names are used)."""
    if to_stored(model, weights).keys() == weights.keys():  # one pass for the usual case, where nothing changes
        return {name: [name] for name in weights}
    return {name: list(to_stored(model, {name: tensor})) for name, tensor in weights.items()}


def to_held(model: nn.Module, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`stored` (checkpoint keys: all the keys of the tensors converted together, such as a block's experts) in
    the layout the model holds, as `from_pretrained` converts them: every renaming, then at most one converter
    per key, the converter's operations once all its keys are collected."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            PrefixChange,
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )
    except ImportError:
        return dict(stored)
    # as transformers' revert_weight_conversion for a model built from a config: no legacy names, no prefix change
    conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)]
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    held, pending = {}, {}
    # in natural order, as transformers loads them: a converter stacks experts 0, 1, ..., 10 in the order it gets them
    for key, tensor in sorted(stored.items(), key=lambda item: dot_natural_key(item[0])):
        renamed, pattern = rename_source_key(key, renamings, converters)
        if pattern is None:
            held[renamed] = tensor
        else:  # one converter per target; it collects its sources and runs once
            pending.setdefault(renamed, deepcopy(by_pattern[pattern])).add_tensor(renamed, key, pattern, tensor)
    for target, converter in pending.items():
        for name, tensor in converter.convert(target, model=model, config=model.config).items():
            held[name] = tensor[0] if isinstance(tensor, list) else tensor
    return held
