"""A checkpoint's own tensor layout against the one the model holds.

transformers 5 converts some tensors when it loads a checkpoint and converts them back when it saves one:
a Mixture-of-Experts checkpoint stores one matrix per expert and projection (`experts.0.w1.weight`, ...), the
model holds one fused tensor per projection pair (`experts.gate_up_proj`, E x 2I x H). A model loaded whole
goes through both on its own. A streamed model reads and writes one block at a time, so it applies the same
conversions to that block's tensors, with transformers' own conversion mapping for the model.
"""

from __future__ import annotations

import re
from copy import deepcopy

import torch
import transformers
from torch import nn

from ..errors import PrunelabError


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


def adopt_conversions(model: nn.Module, keys: list[str]) -> None:
    """Give `model`, built from its config, the conversions `from_pretrained` uses on a checkpoint with these `keys`,
    as transformers keeps them on a loaded model (`_weight_conversions`: those that matched a key), so that its
    reading (`renamed_keys`, `to_held`) and its saving (`to_stored`) treat them as they treat the loaded model:
    a multimodal Qwen 3.5's `model.language_model.` prefix is taken off on reading and put back on saving, and a
    conversion the checkpoint does not need is not reverted on saving either."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import rename_source_key
    except ImportError:  # a transformers without conversions loads and saves the names it finds
        return
    mapping = get_model_conversion_mapping(model, add_legacy=False)
    renamings, converters = _split(mapping)
    held, prefix = model.state_dict(), model.base_model_prefix
    for key in keys:
        rename_source_key(key, renamings, converters, prefix, held)  # marks the conversions it applies
    model._weight_conversions = [c for c in mapping if c.was_used()]


def _in_use(model: nn.Module) -> tuple[list, list]:
    """(renamings, converters) that name a checkpoint's keys for `model`: those `adopt_conversions` kept, else those
    transformers' revert_weight_conversion uses for a model built from a config (no legacy names, no prefix change)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange

    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:
        conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False)
                       if not isinstance(c, PrefixChange)]
    return _split(conversions)


def _split(conversions: list) -> tuple[list, list]:
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    return ([c for c in conversions if isinstance(c, WeightRenaming)],
            [c for c in conversions if isinstance(c, WeightConverter)])


def renamed_keys(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """{checkpoint key: the model's name} of the keys `from_pretrained` renames without converting (a multimodal
    Gemma 3 saves its text model as `language_model.model.layers.0...`, and holds it as
    `model.language_model.layers.0...`; a multimodal Llama 4 checkpoint loads into its text model with the
    `language_model.` prefix, its `base_model_prefix`, taken off); the keys it keeps or converts are left out."""
    try:
        from transformers.core_model_loading import rename_source_key
    except ImportError:  # a transformers without conversions loads the names it finds
        return {}
    renamings, converters = _in_use(model)
    held, prefix = model.state_dict(), model.base_model_prefix
    renamed = {}
    for key in keys:  # as transformers' convert_and_load_state_dict_in_model names each key
        name, pattern = rename_source_key(key, renamings, converters, prefix, held)
        if name not in held and key in held:  # renamed where it should not have been
            name, pattern = rename_source_key(key, [], [], prefix, held)
        if pattern is None and name != key:
            renamed[key] = name
    return renamed


def saved_keys(model: nn.Module, renamed: dict[str, str]) -> dict[str, str]:
    """{the model's name: the key `save_pretrained` writes it under} for the `renamed` keys ({checkpoint key: name},
    `renamed_keys`) that it does not write back where they were read from: a `base_model_prefix` taken off on
    loading is not put back (a multimodal Llama 4's `language_model.`), a renaming it reverts is."""
    state = model.state_dict()
    read_from = {name: key for key, name in renamed.items() if name in state}
    saved = stored_names(model, {name: state[name] for name in read_from})
    return {name: keys[0] for name, keys in saved.items() if keys != [read_from[name]]}


def to_held(model: nn.Module, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`stored` (checkpoint keys: all the keys of the tensors converted together, such as a block's experts) in
    the layout the model holds, as `from_pretrained` converts them: every renaming, then at most one converter
    per key, the converter's operations once all its keys are collected."""
    try:  # transformers internals (5.17 to 5.25 checked): taking the tensors as stored would be silently wrong
        from transformers.core_model_loading import dot_natural_key, rename_source_key
    except ImportError as exc:
        raise PrunelabError(f"this transformers ({transformers.__version__}) lacks the conversion internals that "
                            f"streaming a checkpoint stored in another layout (routed experts) needs: {exc}") from None
    renamings, converters = _in_use(model)
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


_NUMBER = r"(?<=\.)\d+(?=\.)"  # a module index in a dotted name


def expert_groups(keys: list[str], experts: int) -> list[list[str]]:
    """`keys` (the checkpoint keys of one held tensor with `experts` rows) grouped by the one number that tells
    them apart, a routed expert's index, in its order: each group converts to that expert's row of the held
    tensor. One group of all the keys when they are not one group per row (a tensor made of pieces that are not
    experts, or a checkpoint whose numbering does not match the rows): the tensor is then converted whole."""
    numbers = [tuple(int(n) for n in re.findall(_NUMBER, key)) for key in keys]
    if len({len(n) for n in numbers}) != 1:
        return [keys]
    varying = [i for i in range(len(numbers[0])) if len({n[i] for n in numbers}) > 1]
    if len(varying) != 1:
        return [keys]
    groups: dict[int, list[str]] = {}
    for key, number in zip(keys, numbers):
        groups.setdefault(number[varying[0]], []).append(key)
    return [groups[i] for i in sorted(groups)] if len(groups) == experts else [keys]


def to_held_by_expert(model: nn.Module, name: str, keys: list[str], read, rows: int):
    """`to_held` of the tensor `name` from its checkpoint `keys` (`read(keys)` gives them), a routed expert at a
    time when the tensor's `rows` are its experts: its rows in order. Otherwise the whole tensor at once."""
    for group in expert_groups(keys, rows):
        yield to_held(model, read(group))[name]


def to_stored_by_expert(model: nn.Module, name: str, tensor: torch.Tensor, keys: list[str]):
    """`to_stored` of the held tensor `name` (saved under `keys`), a routed expert (a row of its first dimension)
    at a time, as dicts by checkpoint key. Converted whole, a block's experts would be copied at once: transformers
    makes each split piece contiguous. Without one expert per row, the whole tensor in one dict."""
    groups = expert_groups(keys, len(tensor))
    if len(groups) == 1:
        yield to_stored(model, {name: tensor})
        return
    for row, group in zip(tensor.split(1), groups):
        pieces = to_stored(model, {name: row})  # keys of expert 0: the group's keys but for that number
        expected, piece_keys = sorted(group), sorted(pieces)
        if [_numberless(k) for k in expected] != [_numberless(k) for k in piece_keys]:
            raise PrunelabError(f"{name}: one expert converts to {piece_keys}, the checkpoint has {expected}")
        yield {key: pieces[piece] for key, piece in zip(expected, piece_keys)}


def _numberless(key: str) -> str:
    return re.sub(_NUMBER, "#", key)
