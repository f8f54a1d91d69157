"""A whole prunelab job: load → calibration and evaluation data → prune → evaluate → save."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import torch

from .config import RunConfig
from .data.sources import check_disjoint, describe, load_text
from .data.windows import calibration_windows, evaluation_windows
from .evaluate.perplexity import perplexity
from .evaluate.sparsity import count_zeros, measure_sparsity, parameter_count, saved_parameter_count, sparsity_of_saved
from .evaluate.speed import generation_speed
from .files import atomic_dir
from .errors import PrunelabError
from .measure import release_memory, stage
from .models.adapters import find_adapter
from .models.loading import load_model
from .pipeline import prune_model
from .reconstruct import prune_and_reconstruct
from .reconstruct.structured import reconstruct_structured
from .structured import prune_structured
from .structured.width import write_structure
from . import report as reporting


def prepare(config: RunConfig) -> None:
    """Checks that cost nothing, done before minutes of work."""
    if config.out and Path(config.out).exists() and not config.overwrite:
        raise PrunelabError(f"output folder already exists: {config.out} (choose another --out or pass --overwrite)")
    check_disjoint(config.calib, config.eval)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)


def calibration_data(config: RunConfig, tokenizer) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """Training windows, held-out windows (for reconstruction; None without), and their record."""
    text = load_text(config.calib, role="calib")
    heldout = config.reconstruct.heldout if config.reconstruct.enabled else 0
    ids, windows, held = calibration_windows(tokenizer, text, config.samples, config.seqlen, config.seed, heldout)
    return ids, held, {"source": config.calib, "description": describe(config.calib), "samples": config.samples,
                       "heldout": heldout, "seqlen": config.seqlen, "seed": config.seed, "bos": False,
                       "text_sha256": hashlib.sha256(text.encode()).hexdigest(), **windows}


def evaluation_data(config: RunConfig, tokenizer) -> tuple[torch.Tensor, dict]:
    text = load_text(config.eval, role="eval")
    windows = evaluation_windows(tokenizer, text, config.eval_seqlen, config.eval_windows)
    return windows, {"source": config.eval, "description": describe(config.eval), "windows": windows.shape[0],
                     "seqlen": config.eval_seqlen, "tokens": windows.numel(), "bos": False,
                     "text_sha256": hashlib.sha256(text.encode()).hexdigest()}


def run(config: RunConfig, progress: bool = True) -> dict:
    prepare(config)
    stages: dict = {}
    with stage("load", stages):
        model, tokenizer, source = load_model(config.model, config.model_dtype, config.device)
    adapter = find_adapter(model)
    data: dict = {}
    with stage("data", stages):
        calib_ids = heldout_ids = None
        if config.needs_calibration:
            calib_ids, heldout_ids, data["calibration"] = calibration_data(config, tokenizer)
        if config.eval != "none":
            eval_ids, data["evaluation"] = evaluation_data(config, tokenizer)
        release_memory()  # tokenising leaves hundreds of MB of freed heap behind

    weights = adapter.prunable_weights()
    zeros_before = count_zeros(weights)
    metrics: dict = {}
    if config.eval != "none" and config.eval_dense:
        with stage("eval_dense", stages):
            metrics["dense"] = perplexity(model, eval_ids, progress=progress, desc="perplexity (dense)")
    reconstruction = structure = None
    layers: list = []
    if config.structured:
        structure = {"parameters_before": parameter_count(model)}
        if config.speed:
            with stage("speed_dense", stages):
                metrics["speed_dense"] = generation_speed(model, tokenizer)
        dense = copy.deepcopy(model) if config.reconstruct.enabled else None
        with stage("prune", stages):
            structure.update(prune_structured(model, adapter, calib_ids, config, progress=progress))
        structure["parameters_after"] = parameter_count(model)
        if dense is not None:
            with stage("reconstruct", stages):
                reconstruction = reconstruct_structured(model, dense, structure, calib_ids,
                                                        heldout_ids, config, progress=progress)
            del dense
            release_memory()
        if config.speed:
            with stage("speed", stages):
                metrics["speed"] = generation_speed(model, tokenizer)
    elif config.reconstruct.enabled:
        with stage("prune+reconstruct", stages):
            layers, reconstruction = prune_and_reconstruct(model, adapter, calib_ids, heldout_ids, config, progress=progress)
    else:
        with stage("prune", stages):
            layers = prune_model(model, adapter, calib_ids, config, progress=progress)
    if config.eval != "none":
        with stage("eval", stages):
            metrics["pruned"] = perplexity(model, eval_ids, progress=progress, desc="perplexity (pruned)")

    report = {
        "config": config.to_dict(),
        "model": {"source": source, "family": adapter.family, "class": type(model).__name__,
                  "parameters": sum(p.numel() for p in model.parameters()), "blocks": len(adapter.blocks)},
        "data": data,
        "metrics": metrics,
        "sparsity": None if config.structured else measure_sparsity(weights, zeros_before),
        "stages": stages,
        "layers": layers,
        "reconstruction": reconstruction,
        "structure": structure,
        "versions": reporting.versions(),
        "output": None,
    }
    narrowed = structure.pop("linears", None) if structure else None  # FLAP: the reload record, saved beside the weights
    if config.out:
        save(model, tokenizer, report, Path(config.out), list(weights), config.overwrite, stages, narrowed)
    return report


def save(model, tokenizer, report: dict, out: Path, weight_names: list[str], overwrite: bool, stages: dict,
         narrowed: dict | None = None) -> None:
    """Write model, tokenizer and report at once; the sparsity in the report is read back from the files."""
    with atomic_dir(out, overwrite=overwrite) as tmp:
        with stage("save", stages):  # ends before the report is written, so that it is in it
            model.save_pretrained(tmp)
            if narrowed:
                write_structure(tmp, narrowed)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if report["sparsity"] is not None:
                saved = sparsity_of_saved(tmp, weight_names)
            else:
                report["structure"]["parameters_saved"] = saved_parameter_count(tmp)
        if report["sparsity"] is not None:
            for name, entry in saved["layers"].items():
                entry["zeros_before"] = report["sparsity"]["layers"][name].get("zeros_before", 0)
            report["sparsity"] = {**saved, "zeros_before": report["sparsity"]["zeros_before"],
                                  "sparsity_before": report["sparsity"]["sparsity_before"], "measured_on": "saved safetensors"}
        report["output"] = str(out)
        reporting.write(report, tmp)
