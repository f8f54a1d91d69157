"""A whole prunelab job: check → read the texts → load → windows → prune (+ recover) → evaluate → save.

Everything that can be checked without the model (options, output folder, text files) is checked
before the model is loaded; what needs the model's config (window lengths, weights) right after.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import tempfile
import warnings
from contextlib import nullcontext
from pathlib import Path

import psutil
import torch
from safetensors import SafetensorError
from transformers import AutoConfig

from . import distributed
from . import report as reporting
from .activations import checked_adapter
from .config import DTYPES, RunConfig
from .data.sources import check_disjoint, describe, load_text
from .data.windows import calibration_windows, check_tokenizer_fits, embedding_rows, evaluation_windows
from .errors import MemoryBudgetWarning, PrunelabError, PrunelabWarning
from .evaluate.perplexity import perplexity
from .evaluate.sparsity import (
    count_zeros,
    measure_sparsity,
    parameter_count,
    saved_parameter_count,
    sparsity_of_saved,
)
from .evaluate.speed import generation_speed
from .evaluate.zeroshot import check_tasks, fetch_task_data, task_names, zero_shot
from .files import atomic_dir, check_output
from .measure import StageRecord, large_allocations_mapped, release_memory, stage
from .models.adapters import find_adapter
from .models.conv1d import released
from .models.layout import stored_names
from .models.loading import (
    broken_weights,
    check_model_fits,
    dtype_name,
    empty_model,
    float_nbytes,
    float_weights,
    in_saved_dtypes,
    load_model,
    load_tokenizer,
    local_model,
    model_path,
    quantization,
    resolve_device,
    round_weights,
    stored_dtype,
    torch_dtype,
)
from .models.narrow import STRUCTURE_FILE, export_masked, write_structure
from .prune.sequential import check_layers, prune_model
from .recover import prune_and_reconstruct, reconstruct_structured, retrain
from .report import Report
from .resume import FREE_KEYS, Checkpoints
from .streaming import (
    Checkpoint,
    ShardWriter,
    StreamedModel,
    StreamedPruning,
    largest_block,
    streamed_perplexity,
    streamed_scorer,
    tokens_per_pass,
)
from .structured import (
    check_structured,
    check_width,
    prune_depth_streamed,
    prune_structured,
    prune_width_streamed,
)
from .structured.depth_streamed import STREAMED_METRICS


def checkpoints_of(config: RunConfig, texts: dict[str, str]) -> Checkpoints | None:
    """The run's checkpoints (resume.py), checked against `--resume`/`--overwrite`; None when the run is not
    saved or has no sequential pass to checkpoint."""
    if not config.out or config.structured:
        return None
    fingerprint = {k: v for k, v in config.to_dict().items() if k not in FREE_KEYS}
    fingerprint["processes"] = distributed.size()  # each holds its own share of the windows' activations
    fingerprint["calibration text sha256"] = hashlib.sha256(texts["calib"].encode()).hexdigest() if "calib" in texts \
        else None
    checkpoints = Checkpoints(Path(config.out), fingerprint)
    checkpoints.open(config.resume, config.overwrite)
    return checkpoints


def check_task_setup(config: RunConfig) -> None:
    """--tasks: lm-eval installed, every name known, the offline tasks' data in the cache; before any model loads."""
    names = task_names(config.tasks)
    check_tasks(names)
    fetch_task_data(names)


def prepare(config: RunConfig) -> None:
    """Checks that cost nothing, done before minutes of work."""
    if config.out:
        check_output(Path(config.out), config.overwrite)
    check_disjoint(config.calib, config.eval)
    if config.tasks:
        check_task_setup(config)
    path = local_model(config.model)
    text_config = local_text_config(path)
    if text_config is not None:  # else once the model is loaded (a hub id, a GGUF file)
        check_lengths(text_config, window_lengths(config))
        check_activations_fit(config, text_config)
        check_layers_before_loading(config, path)
        check_bos_before_loading(config, path)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)


def local_text_config(path: Path | None):
    """The text config of a local model folder (`model_path`), read before the model is loaded; None for anything
    else (a hub id is not fetched twice, and a folder loading would refuse is refused there, by name)."""
    if path is None or not (path / "config.json").is_file():
        return None
    try:
        return AutoConfig.from_pretrained(path).get_text_config()
    except Exception:  # transformers' errors for a config it cannot read vary; loading names them
        return None


def check_layers_before_loading(config: RunConfig, path: Path) -> None:
    """`skip` and N:M patterns checked against the modules of the local model at `path` built on the meta device, so
    that a mistyped pattern is not found minutes later, once a large model has loaded (which is checked again)."""
    if config.structured or not (config.skip or config.pattern) or quantization(path) is not None:
        return
    try:
        adapter = find_adapter(empty_model(path))  # its module tree alone: a meta model runs no probe
    except Exception:  # an architecture the loaded model would be refused for, in its own words, or built otherwise
        return
    check_layers(adapter, config)


def check_bos_before_loading(config: RunConfig, path: Path) -> None:
    """`eval_bos` needs a BOS token: the local model's tokenizer loads in a second, a large model in minutes."""
    if config.eval_bos and config.eval != "none":
        check_bos(load_tokenizer(path))


def check_activations_fit(config: RunConfig, text_config) -> None:
    """The calibration windows' activations fit the machine: one float32 copy of the residual stream of every
    window is the least a run holds (in memory, or in files where reconstruction may offload it); retraining holds
    its windows' token ids. A mistyped --samples 1000000000 was killed by the OOM killer, after loading the model."""
    hidden = getattr(text_config, "hidden_size", None)
    if not config.needs_calibration or not isinstance(hidden, int):
        return
    recon = config.reconstruct
    held = recon.heldout if recon.enabled else 0
    need = (config.samples + held) * config.seqlen * hidden * 4
    offloads = recon.enabled and recon.offload != "off" and resolve_device(config.device).type == "cpu"
    memory = psutil.virtual_memory().total
    room = memory + (shutil.disk_usage(tempfile.gettempdir()).free if offloads else 0)
    if need > room:
        raise PrunelabError(f"samples {config.samples}{f' (and {held} held-out)' if held else ''} calibration windows "
                            f"of {config.seqlen} tokens take {need / 1e9:.3g} GB as "
                            f"float32 activations (hidden size {hidden}), more than this machine's {room / 1e9:.3g} "
                            f"GB of memory{' and free disk' if offloads else ''}: lower --samples or --seqlen")
    rt = config.retrain
    ids = (math.ceil(rt.tokens / config.seqlen) + rt.heldout) * config.seqlen * 8 if rt.enabled else 0
    if ids > memory:
        raise PrunelabError(f"retrain.tokens {rt.tokens} take {ids / 1e9:.3g} GB as token ids, more than this "
                            f"machine's {memory / 1e9:.3g} GB of memory")


def read_texts(config: RunConfig) -> dict[str, str]:
    """The calibration and evaluation texts (those the run needs), read and checked before the model loads."""
    texts = {}
    if config.needs_calibration:
        texts["calib"] = load_text(config.calib, role="calib")
    if config.eval != "none":
        texts["eval"] = load_text(config.eval, role="eval")
    if len(texts) == 2 and texts["calib"] == texts["eval"]:
        raise PrunelabError(f"calibration and evaluation text must be disjoint; {config.calib} and {config.eval} "
                            "hold the same text")
    return texts


def window_lengths(config: RunConfig) -> dict[str, int]:
    """The window lengths a run feeds the model, by option name."""
    lengths = {"seqlen": config.seqlen} if config.needs_calibration else {}
    return {**lengths, "eval_seqlen": config.eval_seqlen + config.eval_bos} if config.eval != "none" else lengths


def check_lengths(text_config, lengths: dict[str, int]) -> None:
    """The window `lengths` (by option name) are positions the model has."""
    limit = getattr(text_config, "max_position_embeddings", None)
    for name, length in lengths.items():
        if limit is not None and length > limit:
            raise PrunelabError(f"{name} {length} exceeds the model's max_position_embeddings {limit}")


def check_model(model, lengths: dict[str, int]) -> None:
    """What the model's own config and weights allow: the window `lengths`, finite weights."""
    check_lengths(model.config.get_text_config(), lengths)
    for name, param in model.named_parameters():
        if param.device.type != "meta" and not torch.isfinite(param).all():  # streamed: NaNs show in activations
            raise PrunelabError(f"the model's weights are broken: {name} holds NaN or inf values")


def calibration_data(config: RunConfig, tokenizer, text: str) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """Training windows, held-out windows (for reconstruction; None without), and their record."""
    heldout = config.reconstruct.heldout if config.reconstruct.enabled else 0
    ids, windows, held = calibration_windows(tokenizer, text, config.samples, config.seqlen, config.seed, heldout)
    return ids, held, {"source": config.calib, "description": describe(config.calib), "samples": config.samples,
                       "heldout": heldout, "seqlen": config.seqlen, "seed": config.seed, "bos": False,
                       "text_sha256": hashlib.sha256(text.encode()).hexdigest(), **windows}


def retraining_data(config: RunConfig, tokenizer, text: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Retraining windows: the budget's worth of calibration-source windows (drawn with the run's seed, so
    the first ones are the reconstruction's), and held-out windows none of them overlaps."""
    rt = config.retrain
    windows = math.ceil(rt.tokens / config.seqlen)
    ids, info, held = calibration_windows(tokenizer, text, windows, config.seqlen, config.seed, rt.heldout)
    return ids, held, {"source": config.calib, "windows": windows, "heldout": rt.heldout, "seqlen": config.seqlen,
                       "seed": config.seed, "text_tokens": info["text_tokens"]}


def check_bos(tokenizer) -> None:
    if tokenizer.bos_token_id is None:
        raise PrunelabError("--eval-bos: the model's tokenizer has no BOS token")


def evaluation_data(config: RunConfig, tokenizer, text: str) -> tuple[torch.Tensor, dict]:
    """Non-overlapping windows of `eval_seqlen` text tokens (with `eval_bos`, each after a BOS token)."""
    windows = evaluation_windows(tokenizer, text, config.eval_seqlen, config.eval_windows)
    if windows.shape[0] < config.eval_windows:
        warnings.warn(PrunelabWarning(f"eval_windows is {config.eval_windows}, but {config.eval} has only "
                                      f"{windows.shape[0]} full windows of {config.eval_seqlen} tokens: "
                                      f"perplexity is measured on those {windows.shape[0]}"), stacklevel=2)
    text_tokens = windows.numel()
    if config.eval_bos:
        check_bos(tokenizer)
        windows = torch.cat([torch.full((windows.shape[0], 1), tokenizer.bos_token_id), windows], dim=1)
    return windows, {"source": config.eval, "description": describe(config.eval), "windows": windows.shape[0],
                     "seqlen": config.eval_seqlen, "tokens": text_tokens, "bos": config.eval_bos,
                     "join": "documents joined by a blank line", "batch": config.eval_batch,
                     "text_sha256": hashlib.sha256(text.encode()).hexdigest()}


class Job:
    """One run's state as it moves through the stages; `run_job` reads as the procedure."""

    def __init__(self, config: RunConfig, progress: bool):
        self.config, self.progress = config, progress
        self.stages: dict[str, StageRecord] = {}
        self.data: dict = {}
        self.metrics: dict = {}
        self.layers: list = []
        self.reconstruction = self.structure = self.retraining = None
        self.calib_ids = self.heldout_ids = self.eval_ids = self.retrain_ids = self.retrain_heldout = None
        self.checkpoints: Checkpoints | None = None
        self.dtypes: dict[str, str] = {}  # the input's stored dtype and the output's, for the report

    def begin(self, texts: dict[str, str]) -> None:
        """Once the model is known and before any work on it: refuse a structured method the architecture
        cannot take, an N:M pattern a layer's width does not divide or a `skip` pattern that names no layer, then
        cut this process's windows from the texts."""
        if self.config.structured:
            check_structured(self.adapter, self.config)
        else:
            check_layers(self.adapter, self.config)
        with stage("windows", self.stages):
            self.windows(texts)
            self.share_windows()

    def windows(self, texts: dict[str, str]) -> None:
        if "calib" in texts:
            self.calib_ids, self.heldout_ids, self.data["calibration"] = calibration_data(
                self.config, self.tokenizer, texts["calib"])
        if self.config.retrain.enabled:
            self.retrain_ids, self.retrain_heldout, self.data["retraining"] = retraining_data(
                self.config, self.tokenizer, texts["calib"])
        if "eval" in texts:
            self.eval_ids, self.data["evaluation"] = evaluation_data(self.config, self.tokenizer, texts["eval"])
        check_tokenizer_fits(embedding_rows(self.model), f"the tokenizer of {self.config.model}", {
            "calibration": self.calib_ids, "held-out": self.heldout_ids, "retraining": self.retrain_ids,
            "retraining held-out": self.retrain_heldout, "evaluation": self.eval_ids})
        release_memory()  # tokenising leaves hundreds of MB of freed heap behind

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """The prunable weights as they are now (read each time: a model held in bfloat16 is reconstructed in
        float32, which gives its parameters new tensors)."""
        return self.adapter.prunable_weights()

    def saved_dtype(self, stored: torch.dtype | None) -> torch.dtype:
        """The dtype the output's weights are saved in (recorded for the report beside the input's): `save_dtype`,
        or by default the input's (a bfloat16 model stays one), or the dtype the model is held in where that is
        narrower or the input has none (GGUF, quantized)."""
        held = torch_dtype(self.config.model_dtype)
        if self.config.save_dtype != "auto":
            saved = torch_dtype(self.config.save_dtype)
        else:
            saved = held if stored is None or held.itemsize <= stored.itemsize else stored
        self.dtypes = {"stored_dtype": dtype_name(stored), "saved_dtype": dtype_name(saved)}
        return saved

    def share_windows(self) -> None:
        """Data parallel (torchrun): this process's share of the calibration and evaluation windows."""
        if distributed.size() == 1:
            return
        shares = {}
        if self.calib_ids is not None:
            part = distributed.share(self.calib_ids.shape[0], "calibration")
            self.calib_ids, shares["calibration"] = self.calib_ids[part], [part.start, part.stop]
        if self.heldout_ids is not None:
            part = distributed.share(self.heldout_ids.shape[0], "held-out")
            self.heldout_ids, shares["heldout"] = self.heldout_ids[part], [part.start, part.stop]
        if self.eval_ids is not None:
            part = distributed.share(self.eval_ids.shape[0], "evaluation")
            self.eval_ids, shares["evaluation"] = self.eval_ids[part], [part.start, part.stop]
        self.data["processes"] = {"world_size": distributed.size(), "rank": distributed.rank(),
                                  "backend": torch.distributed.get_backend(), "windows": shares}

    def evaluate(self, key: str, desc: str) -> None:
        with stage(f"eval_{key}" if key == "dense" else "eval", self.stages):
            self.metrics[key] = perplexity(self.model, self.eval_ids, batch_size=self.config.eval_batch,
                                           progress=self.progress, desc=desc)

    def zero_shot(self, key: str, streamed: StreamedModel | None = None, pass_tokens: int = 0) -> None:
        """lm-eval on the model in memory (or on `streamed`, in passes of `pass_tokens`); under torchrun process 0
        alone runs it (the harness does not split an in-memory model's requests) and the others wait for its
        result."""
        with stage(f"tasks_{key}" if key == "dense" else "tasks", self.stages):
            result = _zero_shot(self.config, streamed or self.model, self.tokenizer, pass_tokens, self.progress) \
                if distributed.is_main() else None
            self.metrics[f"zeroshot_{key}" if key == "dense" else "zeroshot"] = distributed.from_main(result)

    def retrain(self) -> None:
        """Retrain after pruning (and reconstruction); `retrain` refuses a model whose pruned weights moved."""
        with stage("retrain", self.stages):
            self.model, self.retraining = retrain(self.model, self.weights, self.config, self.retrain_ids,
                                                  self.retrain_heldout, progress=self.progress)
        release_memory()

    def prune_structured(self) -> None:
        config, model = self.config, self.model
        self.structure = {"parameters_before": parameter_count(model)}
        if config.speed:
            with stage("speed_dense", self.stages):
                self.metrics["speed_dense"] = generation_speed(model, self.tokenizer)
        dense = copy.deepcopy(model) if config.reconstruct.enabled else None
        with stage("prune", self.stages):
            self.structure.update(prune_structured(model, self.adapter, self.calib_ids, config, progress=self.progress))
        self.structure["parameters_after"] = parameter_count(model)
        if dense is not None:
            with stage("reconstruct", self.stages):
                self.reconstruction = reconstruct_structured(model, dense, self.structure, self.calib_ids,
                                                             self.heldout_ids, config, progress=self.progress)
            del dense
            release_memory()
        if config.speed:
            with stage("speed", self.stages):
                self.metrics["speed"] = generation_speed(model, self.tokenizer)

    def prune(self) -> None:
        config = self.config
        if config.reconstruct.enabled:
            with stage("prune+reconstruct", self.stages):
                self.layers, self.reconstruction = prune_and_reconstruct(
                    self.model, self.adapter, self.calib_ids, self.heldout_ids, config, progress=self.progress,
                    checkpoints=self.checkpoints)
        else:
            with stage("prune", self.stages):
                self.layers = prune_model(self.model, self.adapter, self.calib_ids, config, progress=self.progress,
                                          checkpoints=self.checkpoints)

    def report(self, zeros_before: dict[str, int] | None, sparsity: dict | None = None) -> Report:
        model, config = self.model, self.config
        if sparsity is None and not config.structured:
            sparsity = measure_sparsity(self.weights, zeros_before)
        return Report(
            config=config.to_dict(),
            model={"source": self.source, "family": self.adapter.family, "class": type(model).__name__,
                   "parameters": sum(p.numel() for p in model.parameters()), "blocks": len(self.adapter.blocks),
                   **self.dtypes,
                   **({"dequantized_from": model.dequantized_from} if hasattr(model, "dequantized_from") else {})},
            data=self.data, metrics=self.metrics,
            sparsity=sparsity,
            stages=self.stages, layers=self.layers, reconstruction=self.reconstruction, structure=self.structure,
            retraining=self.retraining,
            versions=reporting.versions(), output=None)


# a streamed reconstruction's peak in blocks trained at once: 4.4 measured on an 8B Llama, 4.5 on a
# Qwen3-30B-A3B-shaped block (docs/RESULTS.md)
RECONSTRUCTION_BLOCKS = 4.5


def memory_budget(config: RunConfig) -> float:
    """GB the model's weights may take: --max-memory, or half the free memory (room for activations, statistics
    and the optimiser beside the weights)."""
    if config.max_memory is not None:
        return config.max_memory
    device = resolve_device(config.device)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available
    return 0.5 * free / 1e9


def streaming_source(config: RunConfig, saving: bool = True) -> tuple[Path, float, float] | None:
    """(folder, weights GB, budget GB) when the model's weights exceed the memory budget and are to be
    streamed; None when the model is loaded whole. What a streamed run cannot do is refused here, before
    any work."""
    path = model_path(config.model)
    if path is None or not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        return None
    quant = quantization(path)
    if quant is not None:  # loaded whole and dequantized, or refused: its stored sizes are not its float sizes
        float_weights(config.model, quant)
        try:
            size = float_nbytes(path, torch_dtype(config.model_dtype)) / 1e9
        except (OSError, ValueError, KeyError) as exc:
            raise PrunelabError(f"cannot load model {config.model!r}: {str(exc).splitlines()[0]}") from None
        budget = memory_budget(config)
        if size > budget:
            raise PrunelabError(f"{config.model} holds {quant['quant_method']}-quantized weights that take "
                                f"{size:.3g} GB as {config.model_dtype}, more than the memory budget {budget:.3g} GB "
                                "(--max-memory); prunelab streams only float checkpoints: raise the budget or "
                                "dequantize it first")
        return None
    try:
        sizes = Checkpoint(path).nbytes(torch_dtype(config.model_dtype))
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise PrunelabError(f"cannot load model {config.model!r}: {broken_weights(path)} is corrupt or truncated "
                            f"({str(exc).splitlines()[0]})") from None
    size, budget = sum(sizes.values()) / 1e9, memory_budget(config)
    if size <= budget:
        return None
    block = largest_block(sizes) / 1e9
    if block > budget:
        raise PrunelabError(f"the memory budget {budget:.3g} GB (--max-memory) is smaller than one decoder block of "
                            f"this model ({block:.3g} GB in {config.model_dtype}); streaming holds one block at a time")
    unsupported = [what for what, asked in (
        ("--retrain", config.retrain.enabled),
        (f"depth metric {config.depth.metric}",
         config.method == "layers" and config.depth.metric not in STREAMED_METRICS),
        (f"reconstruction after {config.method}", config.structured and config.reconstruct.enabled),
        ("a saved output (--out)", saving and not config.out)) if asked]
    if unsupported:
        raise PrunelabError(f"the model's weights take {size:.3g} GB in {config.model_dtype}, more than the memory "
                            f"budget {budget:.3g} GB (--max-memory): it is streamed block by block, which does not "
                            f"support {', '.join(unsupported)} yet")
    halves = config.reconstruct.halves_per_submodel
    need = RECONSTRUCTION_BLOCKS * (size if halves is None else block * max(1, halves // 2))
    # the check above is pruning's: one block; process 0 decides for all under torchrun, and warns once
    if saving and config.reconstruct.enabled and need > budget and distributed.is_main():
        warnings.warn(MemoryBudgetWarning(
            f"{config.reconstruct.granularity} reconstruction of this model will hold about {need:.3g} GB (the "
            f"trained blocks, their AdamW moments and gradients: ~{RECONSTRUCTION_BLOCKS}x a block), more than the "
            f"memory budget {budget:.3g} GB (--max-memory)"), stacklevel=2)
    return path, size, budget


def start_processes(config: RunConfig) -> None:
    """Under torchrun: join the process group; every process must run the same job."""
    distributed.start(resolve_device(config.device))
    if distributed.size() == 1:
        return
    distributed.check_same_config(config.to_dict())


def run_job(config: RunConfig, progress: bool = True) -> Report:
    prepare(config)
    start_processes(config)
    streaming = distributed.from_main(streaming_source(config))  # one decision (the free memory differs)
    job = Job(config, progress)
    with stage("data", job.stages):
        texts = read_texts(config)
    job.checkpoints = checkpoints_of(config, texts)
    try:
        if streaming is None:
            report = run_loaded(job, texts)
        else:
            with large_allocations_mapped() as mapped:  # memory is what binds: freed tensors go back at once
                report = run_streamed(job, texts, *streaming, mapped)
    except Exception:
        # An error the process lives to report (disk full, NaNs, a bug) leaves nothing behind; a process
        # that is killed (kill -9, the OOM killer, a power cut) or interrupted (Ctrl-C) leaves its
        # checkpoints for --resume, and so does a failing resumed run.
        if job.checkpoints is not None and not config.resume:
            job.checkpoints.finish()
        raise
    if job.checkpoints is not None:
        job.checkpoints.finish()
    return report


def run_loaded(job: Job, texts: dict[str, str]) -> Report:
    """`run_job` from loading the model to saving the output."""
    config = job.config
    with stage("load", job.stages):
        job.model, job.tokenizer, job.source = load_model(config.model, config.model_dtype, config.device)
        check_model(job.model, window_lengths(config))
        dtype = job.saved_dtype(stored_dtype(config.model))
        check_model_fits(job.model, dtype)
    job.adapter = checked_adapter(job.model)
    job.begin(texts)
    del texts
    zeros_before = count_zeros(job.weights)
    if config.eval != "none" and config.eval_dense:
        job.evaluate("dense", "perplexity (dense)")
    if config.tasks and config.eval_dense:
        job.zero_shot("dense")
    if config.structured:
        job.prune_structured()
    else:
        job.prune()
    if config.retrain.enabled:
        job.retrain()
    round_weights(job.model, dtype)  # every number after pruning is of the weights as saved
    if config.eval != "none":
        job.evaluate("pruned", "perplexity (pruned)")
    if config.tasks:
        job.zero_shot("pruned")
    report = job.report(zeros_before)
    narrowed = job.structure.pop("linears", None) if job.structure else None  # FLAP: saved beside the weights
    if config.out and distributed.is_main():
        save(in_saved_dtypes(job.model, dtype), job.tokenizer, report, Path(config.out), job.weights, config.overwrite,
             job.stages, narrowed)
    return report


def run_streamed(job: Job, texts: dict[str, str], folder: Path, size_gb: float, budget_gb: float,
                 mapped: bool = False) -> Report:
    """`run_job` for a model larger than the memory budget: pruning (and reconstruction) with the blocks of
    one submodel in memory at a time, the output written shard by shard as they finish (streaming.py)."""
    config = job.config
    with stage("load", job.stages):
        streamed = StreamedModel(folder, torch_dtype(config.model_dtype), resolve_device(config.device))
        job.model, job.adapter, job.source = streamed.model, streamed.adapter, str(folder)
        streamed.saved_dtype = job.saved_dtype(streamed.source.dtype)
        job.tokenizer = load_tokenizer(folder)
        check_model(job.model, window_lengths(config))
        streamed.check_adapter(*([check_width] if config.method == "flap" else []))
    job.begin(texts)
    del texts
    if config.eval != "none" and config.eval_dense:
        with stage("eval_dense", job.stages):
            job.metrics["dense"] = streamed_perplexity(streamed, job.eval_ids, config.eval_batch, progress=job.progress,
                                                       desc="perplexity (dense)")
    pass_tokens = tokens_per_pass(streamed, budget_gb)
    if config.tasks and config.eval_dense:
        job.zero_shot("dense", streamed, pass_tokens)
    out, main = Path(config.out), distributed.is_main()
    # data parallel: process 0 writes the output; the others read the pruned shards from its folder
    with atomic_dir(out, overwrite=config.overwrite) if main else nullcontext() as tmp:
        tmp = Path(distributed.from_main(str(tmp) if main else None))
        shards = tmp
        if job.checkpoints is not None:  # the finished blocks' shards are the checkpoint's weights
            job.checkpoints.claim()
            shards = job.checkpoints.folder / "shards"
        writer = ShardWriter(shards, streamed)
        visits = StreamedPruning(streamed, writer)
        streamed_pass(job, visits)
        with stage("save", job.stages):
            saved = save_streamed(job, writer, visits, tmp) if main else None
            saved = distributed.from_main(saved)  # (the others wait here until the output is written)
        if config.eval != "none":
            with stage("eval", job.stages):
                # a structured output has other shapes or fewer blocks, and one whose embedding, norms or head were
                # written in another dtype than the input's has them rounded: read as the saved model it is
                as_input = job.structure is None and not writer.recasts
                pruned = streamed if as_input else StreamedModel(tmp, streamed.compute_dtype, streamed.device)
                written = streamed.checkpoint(tmp) if pruned is streamed else None
                job.metrics["pruned"] = streamed_perplexity(pruned, job.eval_ids, config.eval_batch, checkpoint=written,
                                                            progress=job.progress, desc="perplexity (pruned)")
        if config.tasks:  # the output as saved, read back block by block
            job.zero_shot("pruned", StreamedModel(tmp, streamed.compute_dtype, streamed.device), pass_tokens)
        if job.structure is not None:
            job.structure["parameters_saved"] = saved
        report = job.report(None, None if job.structure is not None else saved)
        report["model"]["streamed"] = {"weights_gb": round(size_gb, 2), "budget_gb": round(budget_gb, 2),
                                       "shards": writer.count, "large_allocations_mapped": mapped}
        if job.structure is not None and config.speed:  # generating a token needs every block: no streamed speed
            report["model"]["streamed"]["speed"] = "not measured: generation would read every block per token"
        report["output"] = str(out)
        if main:
            reporting.write(report, tmp)
    return report


def save_streamed(job: Job, writer: ShardWriter, visits: StreamedPruning, tmp: Path) -> dict | int:
    """The streamed output completed in `tmp`: its sparsity read back from the files (structured pruning: the
    count of numbers stored)."""
    writer.move(tmp)
    writer.finish()
    job.model.config.dtype = writer.dtype
    job.model.config.architectures = [type(job.model).__name__]  # as save_pretrained names the class (a multimodal
    job.model.config.save_pretrained(tmp)  # checkpoint's text model has none of its own)
    job.tokenizer.save_pretrained(tmp)
    if job.structure is not None:
        if "linears" in job.structure:  # FLAP
            write_structure(tmp, job.structure.pop("linears"))
        return saved_parameter_count(tmp)
    names = list(visits.zeros_before)
    sparsity = sparsity_of_saved(tmp, names, visits.streamed.keys_of(names, saved=True))
    for name, entry in sparsity["layers"].items():
        entry["zeros_before"] = visits.zeros_before[name]
    before = sum(visits.zeros_before.values())
    sparsity.update(zeros_before=before, sparsity_before=before / max(sparsity["numel"], 1),
                    measured_on="saved safetensors")
    return sparsity


def streamed_pass(job: Job, visits: StreamedPruning) -> None:
    """Pruning (with reconstruction), FLAP or layer removal of a streamed model: each block in memory for its
    turn only."""
    config = job.config
    if config.structured:
        prune = prune_width_streamed if config.method == "flap" else prune_depth_streamed
        with stage("prune", job.stages):
            job.structure = {"parameters_before": parameter_count(job.model)}
            job.structure.update(prune(visits, job.calib_ids, config, progress=job.progress))
            job.structure["parameters_after"] = parameter_count(job.model)
    elif config.reconstruct.enabled:
        with stage("prune+reconstruct", job.stages):
            job.layers, job.reconstruction = prune_and_reconstruct(
                job.model, job.adapter, job.calib_ids, job.heldout_ids, config, progress=job.progress,
                checkpoints=job.checkpoints, visits=visits)
    else:
        with stage("prune", job.stages):
            job.layers = prune_model(job.model, job.adapter, job.calib_ids, config, progress=job.progress,
                                     checkpoints=job.checkpoints, visits=visits)


def save(model, tokenizer, report: Report, out: Path, weights: dict[str, torch.Tensor], overwrite: bool,
         stages: dict[str, StageRecord], narrowed: dict | None = None) -> None:
    """Write model, tokenizer and report at once; the sparsity in the report is read back from the files."""
    with atomic_dir(out, overwrite=overwrite) as tmp:
        with stage("save", stages):  # ends before the report is written, so that it is in it
            with released(model):  # GPT-2's Conv1D layers as its checkpoints store them
                model.save_pretrained(tmp)
            if narrowed:
                write_structure(tmp, narrowed)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if report["sparsity"] is not None:
                saved = sparsity_of_saved(tmp, list(weights), stored_names(model, weights))
            else:
                report["structure"]["parameters_saved"] = saved_parameter_count(tmp)
        if report["sparsity"] is not None:
            for name, entry in saved["layers"].items():
                entry["zeros_before"] = report["sparsity"]["layers"][name].get("zeros_before", 0)
            report["sparsity"] = {**saved, "zeros_before": report["sparsity"]["zeros_before"],
                                  "sparsity_before": report["sparsity"]["sparsity_before"],
                                  "measured_on": "saved safetensors"}
        report["output"] = str(out)
        reporting.write(report, tmp)


def evaluate_model(config: RunConfig) -> dict:
    """`prunelab eval`: perplexity and/or zero-shot accuracy, and sparsity, of any model, with `run`'s protocols."""
    if config.eval == "none" and not config.tasks:
        raise PrunelabError("prunelab eval needs an evaluation text (--eval) or zero-shot tasks (--tasks)")
    if config.tasks:
        check_task_setup(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    path = local_model(config.model)  # before a text that may come from the hub
    text = load_text(config.eval, role="eval") if config.eval != "none" else None
    if text is not None and (text_config := local_text_config(path)) is not None:
        check_lengths(text_config, {"eval_seqlen": config.eval_seqlen + config.eval_bos})
        check_bos_before_loading(config, path)
    streaming = streaming_source(config, saving=False)
    if streaming is not None:
        return evaluate_streamed(config, text, streaming[0], streaming[2])
    model, tokenizer, source = load_model(config.model, config.model_dtype, config.device)
    if text is not None:
        check_model(model, {"eval_seqlen": config.eval_seqlen + config.eval_bos})
    result = {"model": source, "sparsity": measure_sparsity(find_adapter(model).prunable_weights())["sparsity"]}
    if text is not None:
        windows, protocol = evaluation_data(config, tokenizer, text)
        check_tokenizer_fits(embedding_rows(model), f"the tokenizer of {config.model}", {"evaluation": windows})
        result.update(perplexity(model, windows, batch_size=config.eval_batch), eval=config.eval,
                      **{k: v for k, v in protocol.items() if k != "source"})
    if config.tasks:
        result["zeroshot"] = _zero_shot(config, model, tokenizer)
    return result


def evaluate_streamed(config: RunConfig, text: str | None, folder: Path, budget_gb: float) -> dict:
    """`prunelab eval` of a model larger than the memory budget: perplexity and zero-shot tasks block by block."""
    with large_allocations_mapped():
        streamed = StreamedModel(folder, torch_dtype(config.model_dtype), resolve_device(config.device))
        tokenizer = load_tokenizer(folder)
        names = list(streamed.adapter.prunable_weights())
        sparsity = sparsity_of_saved(folder, names, streamed.keys_of(names))
        result = {"model": str(folder), "sparsity": sparsity["sparsity"], "streamed": True}
        if text is not None:
            check_model(streamed.model, {"eval_seqlen": config.eval_seqlen + config.eval_bos})
            windows, protocol = evaluation_data(config, tokenizer, text)
            check_tokenizer_fits(embedding_rows(streamed.model), f"the tokenizer of {config.model}",
                                 {"evaluation": windows})
            result.update(streamed_perplexity(streamed, windows, config.eval_batch), eval=config.eval,
                          **{k: v for k, v in protocol.items() if k != "source"})
        if config.tasks:
            result["zeroshot"] = _zero_shot(config, streamed, tokenizer, tokens_per_pass(streamed, budget_gb))
        return result


def _zero_shot(config: RunConfig, model, tokenizer, pass_tokens: int = 0, progress: bool = True) -> dict:
    """`--tasks` on a model in memory, or on a StreamedModel in passes of `pass_tokens` tokens (recorded)."""
    if not isinstance(model, StreamedModel):
        return zero_shot(model, tokenizer, task_names(config.tasks), config.task_limit, config.task_batch)
    score = streamed_scorer(model, config.task_batch, pass_tokens, progress)
    return zero_shot(model.model, tokenizer, task_names(config.tasks), config.task_limit, config.task_batch,
                     score=score) | {"streamed_tokens_per_pass": pass_tokens}


def export_same_shape(model_dir: Path, out: Path, overwrite: bool) -> None:
    """`prunelab export`: a FLAP-narrowed folder written at its original shapes for stock loaders."""
    local_model(str(model_dir))  # a path that holds no model is named as such
    if not (model_dir / STRUCTURE_FILE).is_file():
        raise PrunelabError(f"{model_dir} has no {STRUCTURE_FILE}: it was not narrowed by prunelab (nothing to expand)")
    check_output(out, overwrite)
    stored = dtype_name(stored_dtype(str(model_dir)))  # zeros and copies: exact in the dtype it was saved in
    model, tokenizer, _ = load_model(str(model_dir), stored if stored in DTYPES else "float32", "cpu")
    linears = json.loads((model_dir / STRUCTURE_FILE).read_text())["linears"]
    with atomic_dir(out, overwrite=overwrite) as tmp:
        with torch.no_grad():
            export_masked(model, linears, tmp)
        tokenizer.save_pretrained(tmp)
