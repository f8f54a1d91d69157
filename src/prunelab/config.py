"""The typed run configuration: the one source of options, defaults, help texts and checks.

Every field is an option of `prunelab run` (the CLI is generated from these dataclasses: the flag is
the field's name, or its `flag` metadata), a key of a YAML/TOML config file (nested sections for
`sparsegpt`, `ria`, `owl`, `reconstruct`, `depth`, `width`) and a keyword of the Python API. Values are checked
for their type as given: `overwrite: "false"` is a string, not false, and is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .criteria import CRITERIA
from .errors import PrunelabError, PrunelabWarning

STRUCTURED_METHODS = ("layers", "flap")
METHODS = (*CRITERIA, *STRUCTURED_METHODS)
STRUCTURES = ("adaptive", "uniform")
DEPTH_METRICS = ("bi", "cl", "taylor", "mag", "ppl")
DTYPES = ("float32", "bfloat16", "float16")
# granularity -> half-blocks per submodel (None: every half of the model; blocks:K is 2K)
GRANULARITIES = {"none": 0, "matrix": 1, "attn-mlp": 1, "block": 2, "blocks:K": None, "model": None}
PROPAGATIONS = ("dense", "sparse", "mixed")
LOSSES = ("mse", "cmse", "nmse", "cosine")
OFFLOAD = ("auto", "on", "off")
SCOPES = ("adjacent", "all")
RETRAIN_METHODS = ("none", "full", "masklora")
PRECISIONS = ("auto", "float32", "bfloat16")
LAYERWISE = ("uniform", "owl")
RETRAIN_LR_GRIDS = {"full": (1e-5, 3e-5, 1e-4), "masklora": (1e-4, 3e-4, 1e-3)}  # --retrain-lr auto's defaults
RENAMED = {"batch_size": "forward_batch"}  # top-level keys of earlier versions
SHORTHANDS = {"reconstruct": "granularity", "retrain": "method"}  # `section: value` means {key: value}


def option(default: Any = dataclasses.MISSING, help: str = "", flag: str | None = None, factory=None):
    """A config field with its command-line help (and flag, when it differs from the field name)."""
    metadata = {"help": help, "flag": flag}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def one_of(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise PrunelabError(f"{name} must be one of {', '.join(choices)}, got {shown(value)}")


def check_decay(section: str, weight_decay: float, lr: float) -> None:
    """AdamW multiplies every weight by 1 - lr x weight_decay each step: at 1 or more it flips their signs and the
    training diverges (as a NaN loss blamed on the learning rate)."""
    if weight_decay * lr >= 1:
        raise PrunelabError(f"{section}.weight_decay {weight_decay:g} x the learning rate {lr:g} is >= 1: AdamW would "
                            f"multiply every weight by {1 - weight_decay * lr:g} each step; use a weight decay below "
                            f"{1 / lr:g}")


def positive(owner: Any, *names: str, prefix: str = "", minimum: int = 1) -> None:
    for name in names:
        if getattr(owner, name) < minimum:
            what = "a positive integer" if minimum == 1 else f">= {minimum}"
            raise PrunelabError(f"{prefix}{name} must be {what}, got {getattr(owner, name)}")


class Checked:
    """Dataclass base: every field's value is checked against its annotation, then `validate()` runs."""

    section: ClassVar[str] = ""  # the key of this section in a config file ("" at the top level)

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, check_type(getattr(self, f.name), hints[f.name], self.key(f.name)))
        self.resolve()
        self.validate()

    @classmethod
    def key(cls, name: str) -> str:
        return f"{cls.section}.{name}" if cls.section else name

    def resolve(self) -> None:
        """Fill in defaults that depend on other fields."""

    def validate(self) -> None:
        """Ranges and choices; types are already checked."""


@dataclass
class SparseGPTConfig(Checked):
    section: ClassVar[str] = "sparsegpt"

    damp: float = option(0.01, "SparseGPT dampening: fraction of mean(diag H) added to the diagonal")
    blocksize: int = option(128, "SparseGPT: columns processed together in the OBS sweep")

    def validate(self) -> None:
        if self.damp < 0:
            raise PrunelabError(f"sparsegpt.damp must be >= 0, got {self.damp}")
        positive(self, "blocksize", prefix="sparsegpt.")


@dataclass
class RiaConfig(Checked):
    section: ClassVar[str] = "ria"

    alpha: float = option(0.5, "RIA: the power of the input norm in the score (0: weights alone)", flag="ria-alpha")

    def validate(self) -> None:
        if self.alpha < 0:
            raise PrunelabError(f"ria.alpha must be >= 0, got {self.alpha}")


@dataclass
class OwlConfig(Checked):
    """OWL's block sparsities (Yin et al., 2024), used by `layerwise: owl`."""

    section: ClassVar[str] = "owl"

    # the paper's M and lambda, with the values of its reference code's examples
    outlier: float = option(5.0, "owl: a Wanda score is an outlier above this many times its block's mean score",
                            flag="owl-outlier")
    spread: float = option(0.08, "owl: block sparsities span 2 x spread around --sparsity, blocks with more outliers "
                                 "pruned less", flag="owl-spread")

    def validate(self) -> None:
        if not self.outlier > 0:
            raise PrunelabError(f"owl.outlier must be > 0, got {self.outlier}")
        if self.spread < 0:
            raise PrunelabError(f"owl.spread must be >= 0, got {self.spread}")


@dataclass
class ReconstructConfig(Checked):
    """Local reconstruction after pruning (docs/DESIGN.md); `granularity: none` turns it off."""

    section: ClassVar[str] = "reconstruct"

    granularity: str | None = option(None, "local reconstruction: attn-mlp | matrix | block | blocks:K | model | none "
                                           "(default: attn-mlp after zeroing weights, none after layers and flap)",
                                     flag="reconstruct")
    # mixed measured best on SmolLM2: the dense model's own activations as targets let every
    # submodel correct the error that reaches it from upstream
    propagation: str = option("mixed", "what each submodel reads and is trained to produce: dense | sparse | mixed")
    loss: str = option("mse", "reconstruction loss: mse | cmse (per-channel normalised) | nmse (per-token "
                              "normalised) | cosine")
    lr: float | str = option("auto", "reconstruction learning rate, or 'auto' (chosen from --lr-grid on held-out "
                                     "calibration windows)")
    lr_grid: tuple[float, ...] = option((1e-4, 3e-4, 1e-3, 3e-3, 1e-2), "learning rates 'auto' tries (comma-separated)")
    lr_probe: int = option(4, "submodels on which 'auto' tries the grid; the winner serves the rest")
    epochs: int = option(1, "reconstruction epochs over the calibration windows")
    # 1 rather than 2: twice the steps for 1.2x the time per window; 29.8 against 30.5 on the default job
    batch_size: int = option(1, "windows per reconstruction optimiser step")
    warmup: float = option(0.1, "fraction of steps with linear warm-up (then linear decay to 0)")
    weight_decay: float = option(0.0, "AdamW weight decay of the reconstruction")
    freeze_norms: bool = option(False, "train only the linears and their biases")
    heldout: int = option(16, "extra calibration windows, disjoint from the training ones, for the lr choice and "
                              "the loss report")
    offload: str = option("auto", "cached activations in memory-mapped files: auto (when RAM is short) | on | off")
    precision: str = option("auto", "reconstruction matmuls: auto (bfloat16 autocast where the hardware has native "
                                    "bfloat16: a GPU, a CPU with AMX or AVX-512 BF16; else float32) | float32 | "
                                    "bfloat16 (weights, residual stream, targets and losses stay float32)")
    scope: str = option("adjacent", "after layer removal: train the blocks next to each cut (adjacent) or all",
                        flag="reconstruct-scope")

    @property
    def enabled(self) -> bool:
        return self.granularity != "none"

    @property
    def halves_per_submodel(self) -> int | None:
        """Half-blocks per submodel; None for the whole model."""
        if self.granularity.startswith("blocks:"):
            return 2 * int(self.granularity.split(":", 1)[1])
        return GRANULARITIES[self.granularity]

    def validate(self) -> None:
        g = self.granularity
        if g is not None and (g not in GRANULARITIES or g == "blocks:K") and not re.fullmatch(r"blocks:[1-9]\d*", g):
            raise PrunelabError("reconstruct.granularity must be one of none, matrix, attn-mlp, block, blocks:K "
                                f"(K a positive integer) or model; got {g!r}")
        one_of("reconstruct.propagation", self.propagation, PROPAGATIONS)
        one_of("reconstruct.loss", self.loss, LOSSES)
        one_of("reconstruct.scope", self.scope, SCOPES)
        one_of("reconstruct.offload", self.offload, OFFLOAD)
        one_of("reconstruct.precision", self.precision, PRECISIONS)
        if isinstance(self.lr, str) and self.lr != "auto":
            raise PrunelabError(f"reconstruct.lr must be a positive number or 'auto', got {self.lr!r}")
        if (not isinstance(self.lr, str) and not self.lr > 0) or not self.lr_grid or min(self.lr_grid) <= 0:
            raise PrunelabError(f"learning rates must be positive (reconstruct.lr {self.lr!r}, "
                                f"reconstruct.lr_grid {list(self.lr_grid)})")
        positive(self, "epochs", "batch_size", "lr_probe", prefix="reconstruct.")
        positive(self, "heldout", prefix="reconstruct.", minimum=0)
        if not 0 <= self.warmup < 1:
            raise PrunelabError(f"reconstruct.warmup must be in [0, 1), got {self.warmup}")
        if self.weight_decay < 0:
            raise PrunelabError(f"reconstruct.weight_decay must be >= 0, got {self.weight_decay}")
        check_decay("reconstruct", self.weight_decay, max(self.lr_grid) if self.lr == "auto" else self.lr)


@dataclass
class RetrainConfig(Checked):
    """Retraining after pruning (and reconstruction): next-token cross-entropy on calibration-source text."""

    section: ClassVar[str] = "retrain"

    method: str = option("none", "retraining after pruning and reconstruction: none | full (every weight) | "
                                 "masklora (LoRA whose update keeps the pruning mask, merged at the end)",
                         flag="retrain")
    # 4 x the reconstruction's default 128 x 512 tokens: the claim to check is that reconstruction
    # matches retraining that sees several times its data
    tokens: int = option(262144, "retraining token budget: calibration-source windows of --seqlen tokens",
                         flag="retrain-tokens")
    lr: float | str = option("auto", "retraining peak learning rate, or 'auto' (the grid's best held-out loss after "
                                     "a --retrain-probe fraction of the steps each)", flag="retrain-lr")
    lr_grid: tuple[float, ...] | None = option(None, "learning rates 'auto' tries (default: full 1e-5,3e-5,1e-4; "
                                                     "masklora 1e-4,3e-4,1e-3)", flag="retrain-lr-grid")
    probe: float = option(0.125, "fraction of the steps each lr of the grid trains for when choosing",
                          flag="retrain-probe")
    batch_size: int = option(4, "windows per retraining micro-batch", flag="retrain-batch")
    accumulate: int = option(2, "micro-batches per optimiser step (gradient accumulation)", flag="retrain-accumulate")
    warmup: float = option(0.1, "fraction of retraining steps with linear warm-up (then linear decay to 0)",
                           flag="retrain-warmup")
    weight_decay: float = option(0.0, "AdamW weight decay of the retraining", flag="retrain-weight-decay")
    checkpointing: bool = option(False, "gradient checkpointing while retraining (less memory, ~1/3 more time)",
                                 flag="retrain-checkpointing")
    precision: str = option("auto", "retraining compute: auto (bfloat16 autocast on a GPU that has it, else "
                                    "float32) | float32 | bfloat16", flag="retrain-precision")
    rank: int = option(16, "masklora: LoRA rank r", flag="lora-rank")
    alpha: float = option(32.0, "masklora: LoRA alpha (the update is scaled by alpha / r)", flag="lora-alpha")
    heldout: int = option(16, "held-out calibration windows for the lr choice and the loss curve",
                          flag="retrain-heldout")
    evals: int = option(8, "held-out evaluations during retraining (points of the loss curve)", flag="retrain-evals")

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def grid(self) -> tuple[float, ...]:
        """The learning rates `lr: auto` tries."""
        return self.lr_grid or RETRAIN_LR_GRIDS.get(self.method, RETRAIN_LR_GRIDS["masklora"])

    def validate(self) -> None:
        one_of("retrain.method", self.method, RETRAIN_METHODS)
        one_of("retrain.precision", self.precision, PRECISIONS)
        if isinstance(self.lr, str) and self.lr != "auto":
            raise PrunelabError(f"retrain.lr must be a positive number or 'auto', got {self.lr!r}")
        if (not isinstance(self.lr, str) and not self.lr > 0) or (self.lr_grid is not None and (
                not self.lr_grid or min(self.lr_grid) <= 0)):
            raise PrunelabError(f"retraining learning rates must be positive (retrain.lr {self.lr!r}, "
                                f"retrain.lr_grid {self.lr_grid!r})")
        positive(self, "tokens", "batch_size", "accumulate", "rank", "heldout", "evals", prefix="retrain.")
        if not 0 < self.probe <= 1:
            raise PrunelabError(f"retrain.probe must be in (0, 1], got {self.probe}")
        if not 0 <= self.warmup < 1:
            raise PrunelabError(f"retrain.warmup must be in [0, 1), got {self.warmup}")
        if self.weight_decay < 0 or self.alpha <= 0:
            raise PrunelabError(f"retrain.weight_decay must be >= 0 and retrain.alpha > 0, got {self.weight_decay} "
                                f"and {self.alpha}")
        check_decay("retrain", self.weight_decay, max(self.grid) if self.lr == "auto" else self.lr)


@dataclass
class DepthConfig(Checked):
    """Prune&Comp layer removal, used by `method: layers`."""

    section: ClassVar[str] = "depth"

    remove: int = option(0, "layers: blocks to remove")
    metric: str = option("bi", "layers: block importance bi | cl | taylor | mag | ppl")
    compensation: bool = option(True, "layers: fold the residual-magnitude scalar into earlier weights (Prune&Comp)")
    one_shot: bool = option(False, "layers: score once and remove every block at once (cl always does)")
    protect_first: int = option(4, "layers: taylor and mag never remove these first blocks ...")
    protect_last: int = option(2, "layers: ... nor these last ones (the reference's '+')")

    def validate(self) -> None:
        one_of("depth.metric", self.metric, DEPTH_METRICS)
        positive(self, "remove", "protect_first", "protect_last", prefix="depth.", minimum=0)


@dataclass
class WidthConfig(Checked):
    """FLAP head and channel removal, used by `method: flap`."""

    section: ClassVar[str] = "width"

    ratio: float = option(0.2, "flap: fraction of the attention and MLP parameters to remove")
    structure: str = option("adaptive", "flap: adaptive (global, standardised scores) | uniform (the same fraction "
                                        "per layer)")
    bias_compensation: bool = option(True, "flap: fold the removed channels' mean output into biases")

    def validate(self) -> None:
        if not 0 < self.ratio < 1:
            raise PrunelabError(f"width.ratio must be in (0, 1), got {self.ratio}")
        one_of("width.structure", self.structure, STRUCTURES)


@dataclass
class RunConfig(Checked):
    model: str = option("smollm2", "hub id, local folder, .gguf file, or 'smollm2' (embedded)")
    method: str = option("wanda", "magnitude | wanda | sparsegpt | ria (zero weights) | layers (remove blocks) | "
                                  "flap (remove heads, channels)")
    sparsity: float = option(0.5, "unstructured sparsity in [0, 1); a pattern or method layers/flap sets its own "
                                  "(a sparsity given beside one is ignored, with a warning)")
    pattern: str | None = option(None, "N:M semi-structured pattern, e.g. 2:4")
    permute: bool = option(False, "reorder the input channels of each down_proj (with gate/up's rows) and of o_proj "
                                  "within each value head (with v_proj's rows) so that the N:M pattern keeps more of "
                                  "the criterion's score; the model computes the same (RIA's channel permutation)")
    skip: tuple[str, ...] = option((), "layers to keep dense: glob patterns over module names, comma-separated, "
                                       "e.g. '*.mlp.down_proj,model.layers.0.*' (zero-weight methods)")
    layerwise: str = option("uniform", "sparsity per block: uniform | owl (outlier-weighted: blocks with more "
                                       "outlier Wanda scores keep more weights, the global ratio kept; unstructured)")
    calib: str = option("enwiki", "calibration text: enwiki | web | wiki | new-wiki | wikitext2 | c4 | "
                                   "a .txt/.jsonl/.parquet file")
    samples: int = option(128, "calibration windows")
    seqlen: int = option(512, "tokens per calibration window")
    eval: str = option("enwiki", "evaluation text (same sources; enwiki's evaluation articles) or 'none'")
    eval_seqlen: int = option(512, "tokens per evaluation window")
    eval_windows: int = option(40, "evaluation windows (0 = every full window of the text)")
    eval_bos: bool = option(False, "prepend the BOS token to every evaluation window (every text token is then "
                                   "predicted; without, a window's first token is context only)")
    eval_dense: bool = option(True, "also evaluate the model before pruning")
    tasks: str | None = option(None, "zero-shot tasks through lm-eval: standard (prunelab's offline set: boolq, rte, "
                                     "hellaswag, winogrande, arc, openbookqa, piqa, copa), bigbench, or "
                                     "comma-separated task names; needs lm-eval (the eval extra)")
    task_limit: int = option(100, "examples per zero-shot task (0 = all)")
    task_batch: int = option(16, "sequences per zero-shot forward pass")
    forward_batch: int = option(8, "windows per calibration forward pass")
    eval_batch: int = option(2, "windows per evaluation forward pass (each window's logits take seqlen × vocab floats)")
    seed: int = option(0, "seed of the calibration windows and of the reconstruction's window order")
    dtype: str = option("float32", "dtype of the calibration forward passes when pruning alone (--reconstruct none): "
                                   "float32 | bfloat16 | float16")
    model_dtype: str = option("float32", "dtype the model is held and evaluated in")
    save_dtype: str = option("auto", "dtype of the saved weights: auto (the input checkpoint's, or model_dtype where "
                                     "that is narrower or the input is a GGUF or quantized file) | float32 | "
                                     "bfloat16 | float16")
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    threads: int | None = option(None, "CPU threads for torch (default: torch's choice)")
    max_memory: float | None = option(None, "GB of memory (of the GPU with --device cuda) the model's weights may "
                                            "take; a larger model (a local safetensors folder) is streamed: read, "
                                            "pruned and written block by block (default: half the free memory)")
    speed: bool = option(True, "layers, flap: generation tokens/s before and after")
    out: str | None = option(None, "output folder (default runs/<model>-<method>-<target>-<reconstruction>)")
    overwrite: bool = option(False, "replace an existing output folder (only one that holds a prunelab run)")
    resume: bool = option(False, "continue an interrupted run (the same command and --out) from its newest "
                                 "checkpoint")
    sparsegpt: SparseGPTConfig = option(factory=SparseGPTConfig)
    ria: RiaConfig = option(factory=RiaConfig)
    owl: OwlConfig = option(factory=OwlConfig)
    reconstruct: ReconstructConfig = option(factory=ReconstructConfig)
    depth: DepthConfig = option(factory=DepthConfig)
    width: WidthConfig = option(factory=WidthConfig)
    retrain: RetrainConfig = option(factory=RetrainConfig)

    def __post_init__(self) -> None:
        for section, key in SHORTHANDS.items():
            if getattr(self, section) is None:
                setattr(self, section, {})
            if isinstance(getattr(self, section), str):  # shorthand: reconstruct: block, retrain: full
                setattr(self, section, {key: getattr(self, section)})
        super().__post_init__()

    def resolve(self) -> None:
        if self.reconstruct.granularity is None:
            self.reconstruct.granularity = "none" if self.structured else "attn-mlp"

    @property
    def structured(self) -> bool:
        """Whether the method removes structure (blocks, heads, channels) rather than zeroing weights."""
        return self.method in STRUCTURED_METHODS

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern) if self.pattern else None

    def validate(self) -> None:
        one_of("method", self.method, METHODS)
        self.validate_target()
        if self.permute and (self.pattern is None or self.structured):
            raise PrunelabError("permute reorders channels so that an N:M pattern keeps more of each layer: it needs "
                                "a pattern (e.g. 2:4), not "
                                + (f"method {self.method}" if self.structured else "an unstructured sparsity"))
        if self.skip and self.structured:
            raise PrunelabError(f"skip keeps layers dense while weights are zeroed; method {self.method} removes "
                                "whole blocks, heads or channels: leave skip out")
        if any(not pattern.strip() for pattern in self.skip):
            raise PrunelabError(f"skip patterns must not be empty, got {list(self.skip)}")
        self.validate_layerwise()
        positive(self, "samples", "seqlen", "eval_seqlen", "forward_batch", "eval_batch", "task_batch")
        positive(self, "eval_windows", "task_limit", minimum=0)
        if self.eval != "none" and self.eval_seqlen < 2 and not self.eval_bos:
            raise PrunelabError(f"eval_seqlen must be >= 2, got {self.eval_seqlen}: a window's first token is context "
                                "only, so a 1-token window predicts nothing (or prepend BOS: eval_bos)")
        if self.threads is not None:
            positive(self, "threads")
            if self.threads > (os.cpu_count() or 1):  # more never helps, and libgomp aborts the process on 10**9
                raise PrunelabError(f"threads {self.threads} is more than this machine's {os.cpu_count()} CPUs")
        if self.max_memory is not None and not self.max_memory > 0:
            raise PrunelabError(f"max_memory must be > 0 (GB), got {self.max_memory}")
        for name in ("dtype", "model_dtype"):
            one_of(name, getattr(self, name), DTYPES)
        one_of("save_dtype", self.save_dtype, ("auto", *DTYPES))
        for name in ("model", "calib", "eval", "device"):
            if not getattr(self, name).strip():
                raise PrunelabError(f"{name} must not be empty")
        if self.out is not None and not self.out.strip():
            raise PrunelabError("out must not be empty (leave it out for the default folder)")
        if self.out is not None:
            self.out = os.path.expanduser(self.out)  # as the model and texts are: a config file's ~/runs/x
        if self.resume and (self.out is None or self.structured):
            raise PrunelabError("resume continues the pruning (and reconstruction) pass of a run saved to an output "
                                f"folder; {'this run has no out' if self.out is None else self.method + ' is not one'}")
        recon = self.reconstruct
        if self.method == "layers" and self.depth.remove < 1:
            raise PrunelabError(f"method layers needs depth.remove >= 1 (blocks to remove), got {self.depth.remove}")
        if self.structured and recon.granularity not in ("none", "attn-mlp", "block"):
            raise PrunelabError(
                f"after {self.method} pruning, reconstruction trains halves or blocks (attn-mlp | block), "
                f"not {recon.granularity}"
            )
        if recon.enabled:
            if recon.heldout < 1:
                raise PrunelabError(
                    "reconstruct.heldout must be >= 1: reconstruction chooses its learning rate and "
                    "reports its losses on held-out windows (or --reconstruct none)"
                )
            if self.dtype != "float32":
                # Measured on SmolLM2: with bfloat16 activations the targets carry rounding noise larger
                # than the errors being reconstructed, and the attention halves' losses rose in training.
                raise PrunelabError(
                    f"reconstruction keeps activations in float32 (dtype {self.dtype} activations are too coarse "
                    "for its targets; --precision bfloat16 runs only its matmuls in bfloat16); use --dtype float32, "
                    "or --reconstruct none to prune alone"
                )
        self.validate_retrain()

    def validate_target(self) -> None:
        """How much goes: a sparsity, or an N:M pattern, or a structured method's own setting, one of them."""
        if self.pattern is None and not 0.0 <= self.sparsity < 1.0:
            raise PrunelabError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.pattern is not None:
            parse_pattern(self.pattern)
            if self.structured:
                size = "depth.remove" if self.method == "layers" else "width.ratio"
                whole = "blocks" if self.method == "layers" else "heads and channels"
                raise PrunelabError(f"pattern {self.pattern} zeroes weights in N:M groups; method {self.method} "
                                    f"removes whole {whole}, as many as {size} says: leave the pattern out")
        self.warn_unused_sparsity()

    def warn_unused_sparsity(self) -> None:
        """A sparsity other than the default beside a pattern or a structured method decides nothing: a run at
        another sparsity than the one written must not pass in silence."""
        if self.sparsity == RunConfig.sparsity:
            return
        if self.pattern is not None:
            n, m = self.nm
            why = f"pattern {self.pattern} keeps {n} of every {m} weights ({(m - n) / m:.0%} sparsity)"
        elif self.structured:
            why = f"method {self.method} removes " + ("depth.remove blocks" if self.method == "layers"
                                                      else "width.ratio of the heads and channels")
        else:
            return
        warnings.warn(PrunelabWarning(f"sparsity {self.sparsity} is ignored: {why}"), stacklevel=2)

    def validate_layerwise(self) -> None:
        one_of("layerwise", self.layerwise, LAYERWISE)
        if self.layerwise == "uniform":
            return
        if self.structured or self.pattern is not None:
            raise PrunelabError(f"layerwise {self.layerwise} sets unstructured block sparsities; it does not apply to "
                                f"{'method ' + self.method if self.structured else 'pattern ' + self.pattern}")
        low, high = self.sparsity - self.owl.spread, self.sparsity + self.owl.spread
        if low < 0 or high >= 1:
            raise PrunelabError(f"layerwise owl: sparsity {self.sparsity} ± owl.spread {self.owl.spread} leaves "
                                f"[0, 1) ({low:.3g} to {high:.3g}); use a smaller owl.spread")

    def validate_retrain(self) -> None:
        rt = self.retrain
        if not rt.enabled:
            return
        if rt.method == "masklora" and (self.structured or (self.pattern is None and self.sparsity == 0)):
            raise PrunelabError(f"--retrain masklora keeps a pruning mask, but {self.method} at this setting zeroes "
                                "no weights (prune with a sparsity > 0 or a pattern, or use --retrain full)")
        if self.seqlen < 2:
            raise PrunelabError(f"retraining predicts each window's next tokens: seqlen must be >= 2, got "
                                f"{self.seqlen}")
        per_step = rt.batch_size * rt.accumulate * self.seqlen
        if rt.tokens < per_step:
            raise PrunelabError(f"retrain.tokens {rt.tokens} is less than one optimiser step: retrain.batch_size "
                                f"{rt.batch_size} x retrain.accumulate {rt.accumulate} x seqlen {self.seqlen} "
                                f"= {per_step} tokens")

    @property
    def needs_calibration(self) -> bool:
        if self.method == "flap" or self.reconstruct.enabled or self.retrain.enabled or self.layerwise != "uniform":
            return True
        if self.structured:
            return self.depth.metric != "mag" or self.depth.compensation
        return CRITERIA[self.method][0] is not None

    @property
    def target_label(self) -> str:
        if self.method == "flap":
            return f"{self.width.ratio:.0%} width"
        if self.structured:
            return f"{self.depth.remove} blocks by {self.depth.metric}"
        return pruning_target(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["reconstruct"]["lr_grid"] = list(self.reconstruct.lr_grid)
        values["skip"] = list(self.skip)
        if self.retrain.lr_grid is not None:
            values["retrain"]["lr_grid"] = list(self.retrain.lr_grid)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        return build(cls, values)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> RunConfig:
        values = load_config_file(path)
        return cls.from_file_values(path, values, {**values, **{k: v for k, v in overrides.items() if v is not None}})

    @classmethod
    def from_file_values(cls, path: str | Path, in_file: dict[str, Any], values: dict[str, Any]) -> RunConfig:
        """The config of the file at `path` (its values `in_file`) with overrides (`values`, both together); an error
        the file's values make on their own names the file."""
        try:
            return cls.from_dict(values)
        except PrunelabError as exc:
            try:
                cls.from_dict(in_file)
            except PrunelabError as alone:
                if str(alone) == str(exc):
                    raise PrunelabError(f"{path}: {exc}") from None
            raise



def pruning_target(values: dict[str, Any]) -> str:
    """"2:4", "50%", with OWL's sparsity per block "50% owl", with layers kept dense "50% skip *.down_proj", from a
    zero-weight run's config as a dict (a report's may predate the `layerwise` and `skip` keys)."""
    target = values["pattern"] or format(values["sparsity"], ".0%")
    layerwise = values.get("layerwise", "uniform")
    target = target if layerwise == "uniform" else f"{target} {layerwise}"
    return f"{target} skip {','.join(values['skip'])}" if values.get("skip") else target


def parse_pattern(pattern: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not match:
        raise PrunelabError(f"pattern must look like N:M (e.g. 2:4), got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise PrunelabError(f"pattern N:M needs 0 < N < M, got {pattern!r}")
    return n, m


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def check_type(value: Any, hint: Any, key: str) -> Any:
    """`value` if it has the type `hint` says (numbers may widen: 2 for 2.0), else a one-line error."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if float in args:
            _check_finite(value, key)  # here: `float | str` would call a NaN neither a number nor a string
        for arg in (a for a in args if a is not type(None)):
            try:
                return check_type(value, arg, key)
            except PrunelabError:
                continue
        raise PrunelabError(f"{key} must be {_describe(hint)}, got {shown(value)}")
    if isinstance(hint, type) and issubclass(hint, Checked):
        if isinstance(value, hint):
            return value
        if isinstance(value, dict):
            return build(hint, value)
        raise PrunelabError(f"{key} must be a mapping of {hint.section} options, got {shown(value)}")
    if origin is tuple:
        try:
            if isinstance(value, (list, tuple)):
                return tuple(check_type(v, args[0], key) for v in value)
        except PrunelabError:
            pass
        raise PrunelabError(f"{key} must be {_describe(hint)}, got {shown(value)}")
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return _check_finite(float(value), key)
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):  # YAML reads 1e-3 as a string
            return _check_finite(float(value), key)  # 1e999 is one
    if hint is str and isinstance(value, str):
        return value
    raise PrunelabError(
        f"{key} must be {_describe(hint)}, got {shown(value)}"
        + (" (a str)" if isinstance(value, str) and shown(value) != "a str" else "")
    )


def shown(value: Any) -> str:
    """A value as an error message shows it: its repr, or its type where that is long or spans lines (a model or a
    tensor passed where a name was expected)."""
    text = repr(value)
    return text if len(text) <= 80 and "\n" not in text else f"a {type(value).__name__}"


def _check_finite(value: Any, key: str) -> Any:
    """`value`, unless it is a float NaN or infinity (YAML's .nan, JSON's NaN): no option means anything by them, and
    most range checks (`damp < 0`) let a NaN through."""
    if isinstance(value, float) and not math.isfinite(value):
        raise PrunelabError(f"{key} must be a finite number, got {value}")
    return value


def _describe(hint: Any) -> str:
    args = typing.get_args(hint)
    if args and typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if typing.get_origin(hint) is tuple:
        return f"a list of {'strings' if args[0] is str else 'finite numbers'}"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def build(cls, values: Any):
    """An instance of the config dataclass `cls` from a mapping, refusing unknown keys."""
    where = cls.section or "config"
    if not isinstance(values, dict):
        raise PrunelabError(f"{where} must be a mapping of option names to values, got {shown(values)}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        hints = [f"{k} is now {RENAMED[k]}" for k in unknown if not cls.section and k in RENAMED]
        raise PrunelabError(
            f"unknown {where} key(s): {', '.join(unknown)}"
            + (f" ({'; '.join(hints)})" if hints else f"; known: {', '.join(sorted(known))}")
        )
    return cls(**values)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Option values from a .yaml/.yml/.toml file, or from a run's prunelab.json (its `config`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PrunelabError(f"config file {path} is a folder, not a file" if path.is_dir() else
                            f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        elif path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            values = tomllib.loads(text)
        elif path.suffix == ".json":
            values = json.loads(text)
            if isinstance(values, dict) and isinstance(values.get("config"), dict) and "versions" in values:
                values = values["config"]  # a run's prunelab.json: redo that run
        else:
            raise PrunelabError(f"config file must be .yaml, .yml, .toml or a run's prunelab.json: {path}")
    except PrunelabError:
        raise
    except Exception as exc:  # the parsers' own exception types differ
        raise PrunelabError(f"cannot parse config file {path}: {exc}".splitlines()[0]) from exc
    if not isinstance(values, dict):
        raise PrunelabError(f"config file {path} must hold a mapping of option names to values")
    return values
