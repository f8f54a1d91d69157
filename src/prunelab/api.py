"""The Python API: prune an in-memory Hugging Face model, or run a whole job from a config."""

from __future__ import annotations

from typing import Any

import torch

from .config import RunConfig
from .data.sources import load_text
from .data.windows import calibration_windows
from .errors import PrunelabError
from .evaluate.sparsity import count_zeros, measure_sparsity
from .models.adapters import find_adapter
from .pipeline import prune_model
from .prune import CRITERIA


def as_config(config: RunConfig | dict | None = None, **overrides: Any) -> RunConfig:
    if isinstance(config, RunConfig):
        values = config.to_dict()
    else:
        values = dict(config or {})
    values.update(overrides)
    return RunConfig.from_dict(values)


def prune(model, tokenizer=None, config: RunConfig | dict | None = None, calibration: torch.Tensor | str | None = None,
          attention_mask: torch.Tensor | None = None, progress: bool = True, **overrides: Any) -> dict:
    """Prune `model` in place and return {"layers": per-layer records, "sparsity": measured sparsity}.

    `calibration` is a [samples, seqlen] tensor of token ids (with an optional `attention_mask`
    marking pad tokens as 0), or the name of a text source (default: `config.calib`), in which case
    windows are drawn with `tokenizer`.
    """
    cfg = as_config(config, **overrides)
    adapter = find_adapter(model)
    ids = None
    if CRITERIA[cfg.method][0] is not None:
        if isinstance(calibration, torch.Tensor):
            ids = calibration
        else:
            if tokenizer is None:
                raise PrunelabError("a tokenizer is needed to draw calibration windows from text")
            text = load_text(calibration or cfg.calib, role="calib")
            ids, _ = calibration_windows(tokenizer, text, cfg.samples, cfg.seqlen, cfg.seed)
    weights = adapter.prunable_weights()
    zeros_before = count_zeros(weights)
    layers = prune_model(model, adapter, ids, cfg, attention_mask=attention_mask, progress=progress)
    return {"layers": layers, "sparsity": measure_sparsity(weights, zeros_before)}


def run(config: RunConfig | dict | None = None, progress: bool = True, **overrides: Any) -> dict:
    """Run a whole job (load, prune, evaluate, save) as `prunelab run` does; returns its report."""
    from .job import run as run_job

    return run_job(as_config(config, **overrides), progress=progress)
