"""The typed run configuration: the one source of defaults, dumped into every report."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PrunelabError

METHODS = ("magnitude", "wanda", "sparsegpt")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class SparseGPTConfig:
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    blocksize: int = 128  # columns processed together in the OBS sweep


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
    dtype: str = "float32"  # dtype of the calibration forward passes
    model_dtype: str = "float32"  # dtype the model is loaded, evaluated and saved in
    device: str = "auto"
    threads: int | None = None
    out: str | None = None
    overwrite: bool = False
    sparsegpt: SparseGPTConfig = field(default_factory=SparseGPTConfig)

    def __post_init__(self) -> None:
        if isinstance(self.sparsegpt, dict):
            self.sparsegpt = _build(SparseGPTConfig, self.sparsegpt, "sparsegpt")
        self.validate()

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

    @property
    def target_label(self) -> str:
        return self.pattern if self.pattern else f"{self.sparsity:.0%}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

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
