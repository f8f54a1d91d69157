"""Sparsity measured on actual tensors: in memory, or in the saved safetensors files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open


def _summary(per_layer: dict[str, dict]) -> dict:
    numel = sum(v["numel"] for v in per_layer.values())
    zeros = sum(v["zeros"] for v in per_layer.values())
    pre = sum(v.get("zeros_before", 0) for v in per_layer.values())
    return {"numel": numel, "zeros": zeros, "sparsity": zeros / max(numel, 1),
            "zeros_before": pre, "sparsity_before": pre / max(numel, 1), "layers": per_layer}


def zeros_in(w: torch.Tensor) -> int:
    # not (w == 0).sum(): the sum of a bool tensor makes an int64 copy of it, 3.2 GB for a Qwen3-30B-A3B block's
    # fused experts, which would exceed a streamed run's memory budget
    return w.numel() - int(torch.count_nonzero(w))


def count_zeros(weights: dict[str, torch.Tensor]) -> dict[str, int]:
    return {name: zeros_in(w) for name, w in weights.items()}


def measure_sparsity(weights: dict[str, torch.Tensor], zeros_before: dict[str, int] | None = None) -> dict:
    per_layer = {}
    for name, w in weights.items():
        zeros = zeros_in(w)
        entry = {"shape": list(w.shape), "numel": w.numel(), "zeros": zeros, "sparsity": zeros / w.numel()}
        if zeros_before is not None:
            entry["zeros_before"] = zeros_before.get(name, 0)
        per_layer[name] = entry
    return _summary(per_layer)


def sparsity_of_saved(folder: str | Path, names: list[str], stored: dict[str, list[str]] | None = None) -> dict:
    """Sparsity of the named tensors as written in `folder`'s safetensors files; `stored`
    (`models.layout.stored_names`): the keys a tensor was saved under where they differ from its name, counted
    together."""
    keys = {name: (stored or {}).get(name, [name]) for name in names}
    wanted, found = {key for name in names for key in keys[name]}, {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        for key, tensor in read_tensors(path, wanted):  # one tensor at a time: the model may not fit in memory
            found.update(measure_sparsity({key: tensor})["layers"])
    missing = wanted - set(found)
    if missing:
        raise KeyError(f"saved model lacks {sorted(missing)[:3]}")
    per_layer = {}
    for name in names:  # in model order
        parts = [found[key] for key in keys[name]]
        numel, zeros = sum(p["numel"] for p in parts), sum(p["zeros"] for p in parts)
        shape = parts[0]["shape"] if len(parts) == 1 else [len(parts), *parts[0]["shape"]]
        per_layer[name] = {"shape": shape, "numel": numel, "zeros": zeros, "sparsity": zeros / numel}
        if len(parts) > 1:
            per_layer[name]["stored_as"] = keys[name]
    return _summary(per_layer)


# safetensors' dtype names (https://github.com/huggingface/safetensors, format.md)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_tensors(path: Path, keys: set[str]):
    """(key, tensor) for each of `keys` that the safetensors file `path` holds, one at a time, read with plain file
    I/O. Memory-mapped (`safe_open`), every page read counts in the process's resident memory until the file
    is closed: measuring a saved 6 GB GPT-2 XL raised the save stage's peak RSS by 6 GB of a file's pages."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")  # the format: an 8-byte header length, a JSON header, the data
        header = json.loads(f.read(size))
        for key in sorted(keys.intersection(header.keys() - {"__metadata__"})):
            entry = header[key]
            if entry["dtype"] not in _DTYPES:
                raise ValueError(f"{path}: {key} has dtype {entry['dtype']}, which prunelab does not read")
            begin, end = entry["data_offsets"]
            data = bytearray(end - begin)
            f.seek(8 + size + begin)
            if f.readinto(data) != len(data):
                raise ValueError(f"{path} is truncated: {key} ends past the end of the file")
            dtype = _DTYPES[entry["dtype"]]
            yield key, (torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)).reshape(
                entry["shape"])


def parameter_count(model: torch.nn.Module) -> int:
    """Distinct parameters (tied tensors once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())



def saved_parameter_count(folder: str | Path) -> int:
    """Numbers stored in `folder`'s safetensors files (tied tensors are stored once)."""
    total = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return total
