"""Load a causal LM from a hub id, a local folder, a GGUF file, or the embedded SmolLM2."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import PrunelabError

EMBEDDED_NAMES = {"smollm2", "smollm2-135m", "embedded"}


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise PrunelabError(f"unknown device {name!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PrunelabError(f"device {name!r} requested but CUDA is not available")
    return device


def _plain(model):
    """Drop the GGUF quantizer bookkeeping: the weights are already dequantised floats."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def load_gguf(path: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return _plain(model), tokenizer


def load_model(spec: str, dtype: str = "float32", device: str = "auto"):
    """Return (model, tokenizer, source) with the model in eval mode on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dt = torch_dtype(dtype)
    target = resolve_device(device)
    if spec.lower() in EMBEDDED_NAMES:
        from ..assets import embedded_model_dir

        spec = str(embedded_model_dir())
    path = Path(spec).expanduser()
    try:
        if path.suffix == ".gguf":
            if not path.is_file():
                raise PrunelabError(f"model file not found: {path}")
            model, tokenizer = load_gguf(path, torch_dt)
        elif path.exists() or spec.startswith((".", "/", "~")):
            if not (path / "config.json").is_file():
                raise PrunelabError(f"not a model folder (no config.json): {path}")
            tokenizer = AutoTokenizer.from_pretrained(path)
            from ..structured.width import STRUCTURE_FILE, load_narrow

            if (path / STRUCTURE_FILE).is_file():  # narrowed by FLAP: layer widths the config cannot express
                model = load_narrow(path, torch_dt)
            else:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dt)
        else:  # a hub id
            tokenizer = AutoTokenizer.from_pretrained(spec)
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch_dt)
    except PrunelabError:
        raise
    except OSError as exc:
        raise PrunelabError(f"cannot load model {spec!r}: {str(exc).splitlines()[0]}") from exc
    except ValueError as exc:
        raise PrunelabError(f"cannot load model {spec!r}: {str(exc).splitlines()[0]}") from exc
    model.to(target).eval()
    model.config.use_cache = False
    return model, tokenizer, str(path if path.exists() else spec)
