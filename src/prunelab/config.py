"""The typed run configuration: the one source of defaults, dumped into every report."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PrunelabError

METHODS = ("magnitude", "wanda", "sparsegpt", "layers", "flap")
STRUCTURES = ("adaptive", "uniform")
DEPTH_METRICS = ("bi", "cl", "taylor", "mag", "ppl")
DTYPES = ("float32", "bfloat16", "float16")
GRANULARITIES = ("none", "matrix", "attn-mlp", "block", "blocks:K", "model")
PROPAGATIONS = ("dense", "sparse", "mixed")
LOSSES = ("mse", "nmse", "cosine")
OFFLOAD = ("auto", "on", "off")


@dataclass
class SparseGPTConfig:
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    blocksize: int = 128  # columns processed together in the OBS sweep


@dataclass
class ReconstructConfig:
    """Local reconstruction after pruning (SPEC §3); `granularity: none` turns it off."""

    granularity: str = "attn-mlp"  # none | matrix | attn-mlp | block | blocks:K | model
    # what each submodel's inputs and targets are: dense | sparse | mixed (measured best on SmolLM2:
    # the dense model's own activations as targets let every submodel correct the error upstream)
    propagation: str = "mixed"
    loss: str = "mse"  # mse | nmse (per-token normalised) | cosine
    lr: float | str = "auto"  # a number, or "auto": chosen from `lr_grid` on held-out calibration windows
    lr_grid: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
    lr_probe: int = 4  # submodels on which `lr: auto` tries the grid; the winner serves the rest
    epochs: int = 1
    batch_size: int = 2  # windows per optimiser step
    warmup: float = 0.1  # fraction of steps with linear warm-up; then linear decay to 0
    weight_decay: float = 0.0
    freeze_norms: bool = False  # train only the linears (and their biases)
    heldout: int = 16  # extra calibration windows, disjoint from the training ones, for lr choice and reporting
    offload: str = "auto"  # keep cached activations in memory-mapped files: on | off | auto (when RAM is short)
    scope: str = "adjacent"  # after layer removal: train the blocks next to each cut | all blocks

    @property
    def enabled(self) -> bool:
        return self.granularity != "none"

    @property
    def blocks_per_submodel(self) -> int | None:
        """Blocks per submodel for block / blocks:K; None for finer or coarser granularities."""
        if self.granularity == "block":
            return 1
        if self.granularity.startswith("blocks:"):
            return int(self.granularity.split(":", 1)[1])
        return None

    def validate(self) -> None:
        g = self.granularity
        if (g not in GRANULARITIES or g == "blocks:K") and not re.fullmatch(r"blocks:[1-9]\d*", g):
            raise PrunelabError(f"reconstruct granularity must be one of none, matrix, attn-mlp, block, blocks:K "
                                f"(K a positive integer) or model; got {g!r}")
        if self.propagation not in PROPAGATIONS:
            raise PrunelabError(f"propagation must be one of {', '.join(PROPAGATIONS)}, got {self.propagation!r}")
        if self.loss not in LOSSES:
            raise PrunelabError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.scope not in ("adjacent", "all"):
            raise PrunelabError(f"reconstruct.scope must be adjacent or all, got {self.scope!r}")
        if self.offload not in OFFLOAD:
            raise PrunelabError(f"offload must be one of {', '.join(OFFLOAD)}, got {self.offload!r}")
        if isinstance(self.lr, str):
            if self.lr != "auto":
                try:
                    self.lr = float(self.lr)
                except ValueError:
                    raise PrunelabError(f"lr must be a positive number or 'auto', got {self.lr!r}") from None
        self.lr_grid = tuple(float(v) for v in self.lr_grid)
        if (not isinstance(self.lr, str) and not self.lr > 0) or not self.lr_grid or min(self.lr_grid) <= 0:
            raise PrunelabError(f"learning rates must be positive (lr {self.lr!r}, lr_grid {list(self.lr_grid)})")
        for name in ("epochs", "batch_size", "lr_probe", "heldout"):
            if getattr(self, name) < 1:
                raise PrunelabError(f"reconstruct.{name} must be a positive integer, got {getattr(self, name)}")
        if not 0 <= self.warmup < 1 or self.weight_decay < 0:
            raise PrunelabError("reconstruct.warmup must be in [0, 1) and reconstruct.weight_decay >= 0")


@dataclass
class DepthConfig:
    """Prune&Comp layer removal (SPEC §5), used by `method: layers`."""

    remove: int = 0  # blocks to remove
    metric: str = "bi"  # bi | cl | taylor | mag | ppl
    compensation: bool = True  # fold the residual-magnitude scalar into earlier weights
    one_shot: bool = False  # score once and remove every block at once (cl always does)
    protect_first: int = 4  # taylor and mag never remove these first blocks ...
    protect_last: int = 2  # ... nor these last ones (the reference's "+")

    def validate(self, method: str) -> None:
        if self.metric not in DEPTH_METRICS:
            raise PrunelabError(f"unknown depth metric {self.metric!r}; choose one of {', '.join(DEPTH_METRICS)}")
        if method == "layers" and self.remove < 1:
            raise PrunelabError(f"method layers needs depth.remove >= 1 (blocks to remove), got {self.remove}")
        if self.remove < 0 or self.protect_first < 0 or self.protect_last < 0:
            raise PrunelabError("depth.remove, depth.protect_first and depth.protect_last must be >= 0")


@dataclass
class WidthConfig:
    """FLAP head and channel removal (SPEC §4), used by `method: flap`."""

    ratio: float = 0.2  # fraction of the attention and MLP parameters to remove
    structure: str = "adaptive"  # adaptive (global, standardised scores) | uniform (the same fraction per layer)
    bias_compensation: bool = True  # fold the removed channels' mean output into a bias

    def validate(self) -> None:
        if not 0 < self.ratio < 1:
            raise PrunelabError(f"width.ratio must be in (0, 1), got {self.ratio}")
        if self.structure not in STRUCTURES:
            raise PrunelabError(f"width.structure must be one of {', '.join(STRUCTURES)}, got {self.structure!r}")


@dataclass
class RunConfig:
    model: str = "smollm2"  # hub id, local folder, .gguf file, or "smollm2" (embedded)
    method: str = "wanda"
    sparsity: float = 0.5  # unstructured ratio; ignored when `pattern` is set
    pattern: str | None = None  # "N:M", e.g. "2:4"
    calib: str = "web"  # see prunelab.data.sources
    samples: int = 128
    seqlen: int = 512
    eval: str = "wiki"  # "none" skips evaluation
    eval_seqlen: int = 512
    eval_windows: int = 40  # 0 = every full window of the text
    eval_dense: bool = True  # also evaluate the model before pruning
    batch_size: int = 8
    seed: int = 0
    dtype: str = "float32"  # dtype of the calibration forward passes when pruning alone (reconstruction: float32)
    model_dtype: str = "float32"  # dtype the model is loaded, evaluated and saved in
    device: str = "auto"
    threads: int | None = None
    speed: bool = True  # tokens/s of generation before and after structured pruning
    out: str | None = None
    overwrite: bool = False
    sparsegpt: SparseGPTConfig = field(default_factory=SparseGPTConfig)
    # None = the method's default: attn-mlp after unstructured pruning, none after layer removal
    reconstruct: ReconstructConfig | dict | str | None = None
    depth: DepthConfig = field(default_factory=DepthConfig)
    width: WidthConfig = field(default_factory=WidthConfig)

    def __post_init__(self) -> None:
        if isinstance(self.sparsegpt, dict):
            self.sparsegpt = _build(SparseGPTConfig, self.sparsegpt, "sparsegpt")
        if isinstance(self.depth, dict):
            self.depth = _build(DepthConfig, self.depth, "depth")
        if isinstance(self.width, dict):
            self.width = _build(WidthConfig, self.width, "width")
        if self.reconstruct is None:
            self.reconstruct = {}
        if isinstance(self.reconstruct, str):  # shorthand: reconstruct: block
            self.reconstruct = {"granularity": self.reconstruct}
        if isinstance(self.reconstruct, dict):
            values = dict(self.reconstruct)
            values.setdefault("granularity", "none" if self.structured else "attn-mlp")
            self.reconstruct = _build(ReconstructConfig, values, "reconstruct")
        self.validate()

    @property
    def structured(self) -> bool:
        """Whether the method removes structure (blocks, heads, channels) rather than zeroing weights."""
        return self.method in ("layers", "flap")

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern) if self.pattern else None

    def validate(self) -> None:
        if self.method not in METHODS:
            raise PrunelabError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.pattern is None and not 0.0 <= self.sparsity < 1.0:
            raise PrunelabError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.pattern is not None:
            parse_pattern(self.pattern)
        for name in ("samples", "seqlen", "eval_seqlen", "batch_size"):
            if getattr(self, name) < 1:
                raise PrunelabError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.eval_windows < 0:
            raise PrunelabError(f"eval_windows must be >= 0, got {self.eval_windows}")
        for name in ("dtype", "model_dtype"):
            if getattr(self, name) not in DTYPES:
                raise PrunelabError(f"{name} must be one of {', '.join(DTYPES)}, got {getattr(self, name)!r}")
        if self.sparsegpt.damp < 0 or self.sparsegpt.blocksize < 1:
            raise PrunelabError("sparsegpt.damp must be >= 0 and sparsegpt.blocksize >= 1")
        self.reconstruct.validate()
        self.depth.validate(self.method)
        if self.method == "flap":
            self.width.validate()
        if self.structured and self.reconstruct.enabled and self.reconstruct.granularity not in ("attn-mlp", "block"):
            raise PrunelabError(f"after {self.method} pruning, reconstruction trains halves or blocks (attn-mlp | block), "
                                f"not {self.reconstruct.granularity}")
        if self.reconstruct.enabled and self.dtype != "float32":
            # Measured on SmolLM2: with bfloat16 activations the targets carry rounding noise larger
            # than the errors being reconstructed, and the attention halves' losses rose in training.
            raise PrunelabError(f"reconstruction computes in float32 (dtype {self.dtype} activations are too coarse "
                                "for its targets); use --dtype float32, or --reconstruct none to prune alone")

    @property
    def needs_calibration(self) -> bool:
        from .prune import CRITERIA

        if self.method == "flap" or self.reconstruct.enabled:
            return True
        if self.structured:
            return self.depth.metric != "mag" or self.depth.compensation
        return CRITERIA[self.method][0] is not None or self.reconstruct.enabled

    @property
    def target_label(self) -> str:
        if self.method == "flap":
            return f"{self.width.ratio:.0%} width"
        if self.structured:
            return f"{self.depth.remove} blocks by {self.depth.metric}"
        return self.pattern if self.pattern else f"{self.sparsity:.0%}"

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["reconstruct"]["lr_grid"] = list(self.reconstruct.lr_grid)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        return _build(cls, values, "config")

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> RunConfig:
        values = load_config_file(path)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(values)


def parse_pattern(pattern: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not match:
        raise PrunelabError(f"pattern must look like N:M (e.g. 2:4), got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise PrunelabError(f"pattern N:M needs 0 < N < M, got {pattern!r}")
    return n, m


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise PrunelabError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        elif path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            values = tomllib.loads(text)
        else:
            raise PrunelabError(f"config file must be .yaml, .yml or .toml: {path}")
    except PrunelabError:
        raise
    except Exception as exc:  # the parsers' own exception types differ
        raise PrunelabError(f"cannot parse config file {path}: {exc}".splitlines()[0]) from exc
    if not isinstance(values, dict):
        raise PrunelabError(f"config file {path} must hold a mapping of option names to values")
    return values


def _build(cls, values: dict[str, Any], where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise PrunelabError(f"unknown {where} key(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    try:
        return cls(**values)
    except TypeError as exc:
        raise PrunelabError(f"bad {where}: {exc}") from exc
