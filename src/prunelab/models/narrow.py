"""Checkpoints of FLAP-narrowed models: layer widths that differ per layer, which stock configs cannot
express. `prunelab_structure.json` beside the weights records, per replaced linear, the kept rows and
columns, the dense shape and whether it has a bias; that is all a loader and the same-shape export need."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from ..errors import PrunelabError
from .adapters import find_adapter
from .conv1d import held_weights, hold, linear_class, released
from .layout import renamed_keys

STRUCTURE_FILE = "prunelab_structure.json"


def write_structure(folder: Path, linears: dict[str, dict]) -> None:
    """What a loader needs to rebuild the narrower layers (shapes, biases, kept rows/columns)."""
    (folder / STRUCTURE_FILE).write_text(json.dumps({"format": "prunelab-width/1", "linears": linears}))


def load_narrow(folder: Path, dtype: torch.dtype):
    """A model saved after width pruning: built from its config, narrowed as recorded, then loaded."""
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    narrow_linears(model, read_structure(folder), dtype)
    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(path)))
    renamed = renamed_keys(model, list(state))  # as `from_pretrained` renames them (GPT-NeoX's embed_out: lm_head)
    state = {renamed.get(key, key): tensor for key, tensor in state.items()}
    for name in held_weights(model) & set(state):  # stored [in, out], held [out, in]
        state[name] = state[name].t()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = set(missing) - _tied_head_keys(model)
    if missing or unexpected:
        raise PrunelabError(f"{folder} does not match its {STRUCTURE_FILE}: missing {sorted(missing)[:3]}, "
                            f"unexpected {sorted(unexpected)[:3]}")
    model.tie_weights()
    return model.eval()


def read_structure(folder: Path) -> dict[str, dict]:
    return json.loads((Path(folder) / STRUCTURE_FILE).read_text())["linears"]


def narrow_linears(model: nn.Module, linears: dict[str, dict], dtype: torch.dtype | None = None) -> None:
    """Replace the recorded linears by ones of their narrowed shapes (uninitialised; on the meta device
    under accelerate's `init_empty_weights`), with `model` held (`conv1d`: the structure records GPT-2's Conv1D
    layers as the linears prunelab holds them as)."""
    hold(model)
    modules = dict(model.named_modules())
    for name, entry in linears.items():
        parent, _, child = name.rpartition(".")
        old = modules[name]
        rows = len(entry["rows"]) if entry["rows"] is not None else old.out_features
        cols = len(entry["cols"]) if entry["cols"] is not None else old.in_features
        setattr(modules[parent], child, linear_class(old)(cols, rows, bias=entry["bias"],
                                                          dtype=dtype or old.weight.dtype))
    adapter = find_adapter(model)
    for block in adapter.blocks:
        adapter.recount(block)


def _expand(linear: nn.Linear, entry: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    out_features, in_features = entry["dense_shape"]
    weight = torch.zeros(out_features, in_features, dtype=linear.weight.dtype)
    rows = torch.arange(out_features) if entry["rows"] is None else torch.tensor(entry["rows"])
    cols = torch.arange(in_features) if entry["cols"] is None else torch.tensor(entry["cols"])
    weight[rows.unsqueeze(1), cols.unsqueeze(0)] = linear.weight.detach().cpu()
    bias = None
    if linear.bias is not None:
        bias = torch.zeros(out_features, dtype=linear.weight.dtype)
        bias[rows] = linear.bias.detach().cpu()
    return weight, bias


def masked_state(model: nn.Module, linears: dict[str, dict]) -> tuple[dict[str, torch.Tensor], bool]:
    """The dense-shaped state dict (removed rows and columns as zeros), and whether any bias was added."""
    modules = dict(model.named_modules())
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    added_bias = False
    for name, entry in linears.items():
        weight, bias = _expand(modules[name], entry)
        state[f"{name}.weight"] = weight
        if bias is not None:
            state[f"{name}.bias"] = bias
            added_bias = True
    return state, added_bias



def export_masked(model: nn.Module, linears: dict[str, dict], folder: Path) -> None:
    """Save a same-shape model that plain transformers loads: removed rows and columns are zeros,
    compensation biases sit in bias slots switched on in the config (others zero)."""
    state, added_bias = masked_state(model, linears)
    config = copy.deepcopy(model.config)
    if added_bias:
        for flag in ("attention_bias", "mlp_bias"):  # Llama-style configs switch all biases of a half at once
            if hasattr(config, flag):
                setattr(config, flag, True)
    dense = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    hold(dense)  # GPT-2's Conv1D layers as `model` holds them, [out, in]; released to be saved
    for key, value in dense.state_dict().items():
        if key not in state and key.endswith(".bias"):
            state[key] = torch.zeros_like(value)
    missing, unexpected = dense.load_state_dict(state, strict=False)
    missing = set(missing) - _tied_head_keys(dense)
    if unexpected or missing:
        raise PrunelabError(
            f"{type(model).__name__}'s config cannot hold the bias compensation ({sorted(unexpected)[:2]}); "
            "prune with --no-bias-compensation for a plain-transformers export"
        )
    dense.tie_weights()
    with released(dense):
        dense.save_pretrained(folder)


def _tied_head_keys(model: nn.Module) -> set[str]:
    """The LM head's weight key when it is tied to the input embeddings (saved once, under the embeddings)."""
    head = model.get_output_embeddings()
    if head is None or not getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        return set()
    return {f"{name}.weight" for name, m in model.named_modules() if m is head}
