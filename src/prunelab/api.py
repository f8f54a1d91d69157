"""The Python API: prune an in-memory Hugging Face model, or run a whole job from a config."""

from __future__ import annotations

import copy
import sys
from contextlib import contextmanager
from typing import Any

import torch

from .activations import checked_adapter
from .config import RunConfig
from .data.sources import load_text
from .data.windows import calibration_windows, check_token_ids, check_tokenizer_fits, embedding_rows
from .errors import PrunelabError
from .evaluate.perplexity import perplexity as window_perplexity
from .evaluate.sparsity import count_zeros, measure_sparsity
from .job import retraining_data, run_job
from .models.conv1d import held
from .prune.sequential import prune_model
from .recover import prune_and_reconstruct, reconstruct_structured, retrain
from .structured import check_structured, prune_structured


def as_config(config: RunConfig | dict | None = None, **overrides: Any) -> RunConfig:
    if isinstance(config, RunConfig):
        values = config.to_dict()
    elif config is None or isinstance(config, dict):
        values = dict(config or {})
    else:
        raise PrunelabError(f"config must be a RunConfig or a dict, got {type(config).__name__}")
    values.update(overrides)
    return RunConfig.from_dict(values)


def _calibration(model, tokenizer, cfg: RunConfig, calibration, attention_mask, heldout):
    """(training ids, their attention mask, held-out ids) from given ids or from a text source."""
    if not cfg.needs_calibration:
        return None, None, None
    if calibration is None or isinstance(calibration, str):
        if tokenizer is None:
            raise PrunelabError("a tokenizer is needed to draw calibration windows from text")
        text = load_text(calibration or cfg.calib, role="calib")
        held = cfg.reconstruct.heldout if cfg.reconstruct.enabled else 0
        ids, _, drawn = calibration_windows(tokenizer, text, cfg.samples, cfg.seqlen, cfg.seed, held)
        check_tokenizer_fits(embedding_rows(model), "the tokenizer given", {"calibration": ids, "held-out": drawn})
        return ids, None, drawn if heldout is None else heldout
    vocab = embedding_rows(model)
    check_token_ids(calibration, vocab, "calibration", attention_mask)
    ids = calibration
    if cfg.reconstruct.enabled and heldout is None:
        keep = ids.shape[0] - cfg.reconstruct.heldout
        if keep < 1:
            raise PrunelabError(f"{ids.shape[0]} calibration windows leave none for training beside "
                                f"reconstruct.heldout={cfg.reconstruct.heldout} held-out ones")
        ids, heldout = ids[:keep], ids[keep:]
        attention_mask = None if attention_mask is None else attention_mask[:keep]
    if heldout is not None:
        check_token_ids(heldout, vocab, "heldout")
    return ids, attention_mask, heldout


def prune(model, tokenizer=None, config: RunConfig | dict | None = None, calibration: torch.Tensor | str | None = None,
          attention_mask: torch.Tensor | None = None, heldout: torch.Tensor | None = None, progress: bool = True,
          **overrides: Any) -> dict:
    """Prune (and, unless `reconstruct="none"`, reconstruct) `model` in place; `method="layers"`
    removes whole blocks instead (`depth={"remove": N, "metric": ...}`), `method="flap"` heads and
    channels (`width={"ratio": 0.2}`).

    Returns {"layers": per-layer pruning records, "sparsity": measured sparsity, "reconstruction":
    per-submodel report or None, "retraining": its record or None} (layer removal: {"structure": what
    was removed and folded}). Retraining (`retrain="full"` or `"masklora"`) draws its windows from
    text (`calibration` if it names a source, else `config.calib`) with `tokenizer`; MaskLoRA's
    adapters are merged back into `model`, which stays the same object.
    `calibration` is a [samples, seqlen] tensor of token ids (with an optional `attention_mask`
    marking pad tokens as 0), or the name of a text source (default: `config.calib`), in which case
    windows are drawn with `tokenizer`. Reconstruction chooses its learning rate and reports its
    losses on held-out windows: `heldout` ids, drawn from the text alongside the training windows, or
    else the last `reconstruct.heldout` rows of a given tensor.
    """
    check_loaded(model)
    if tokenizer is not None and not callable(tokenizer):  # token ids given second, where the tokenizer goes
        raise PrunelabError(f"tokenizer must be the model's tokenizer, got a {type(tokenizer).__name__}; token ids go "
                            "in calibration=")
    cfg = as_config(config, **overrides)
    if cfg.retrain.enabled and tokenizer is None:
        raise PrunelabError("retraining draws its windows from text: pass a tokenizer")
    with autograd_on(), held(model), evaluating(model):  # held: GPT-2's Conv1D layers as linears for the work
        return _prune(model, tokenizer, cfg, calibration, attention_mask, heldout, progress)


@contextmanager
def evaluating(model):
    """`model` in eval mode for the work, each module's mode given back after: a model in train mode pruned and
    reconstructed its dropout's random activations, not its own."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        model.train(modes[model])  # modules the work added (MaskLoRA's, FLAP's narrower linears) take the model's
        for module, training in modes.items():
            module.training = training


@contextmanager
def autograd_on():
    """Torch's default autograd mode, whatever the caller's: reconstruction and retraining take gradients (within a
    caller's `torch.no_grad()` their loss had none), and the parts that need none say so themselves."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def check_loaded(model) -> None:
    """`model` is a torch model whose weights are in memory (a name, or a model built on the meta device or offloaded
    to disk by accelerate, would fail deep in the first forward pass)."""
    if not isinstance(model, torch.nn.Module):
        raise PrunelabError(f"model must be a loaded model (a transformers causal LM), got a {type(model).__name__}; "
                            "prunelab.run(model=...) loads one by name or path")
    if any(p.is_inference() for p in model.parameters()):  # pruning writes into them, reconstruction trains them
        raise PrunelabError("the model was loaded under torch.inference_mode(), and its weights cannot be changed "
                            "outside it: load it outside inference mode")
    tuners = sys.modules.get("peft.tuners.tuners_utils")  # a model with PEFT's layers has imported it
    tuned = tuners and next((name for name, m in model.named_modules() if isinstance(m, tuners.BaseTunerLayer)), None)
    if tuned:
        raise PrunelabError(f"{tuned} carries PEFT adapters: merge them into the weights first (merge_and_unload()), "
                            "then prune; a pruned weight under a dense adapter is not sparse")
    meta = next((name for name, p in model.named_parameters() if p.device.type == "meta"), None)
    if meta is not None:
        raise PrunelabError(f"the model's weights are not in memory ({meta} is on the meta device: not loaded, or "
                            "offloaded by a device_map): load it whole, or let prunelab.run stream it from its folder")


def _prune(model, tokenizer, cfg: RunConfig, calibration, attention_mask, heldout, progress: bool) -> dict:
    adapter = checked_adapter(model)
    if cfg.structured:  # what the method cannot do to this model, before the calibration windows are drawn
        check_structured(adapter, cfg)
    ids, attention_mask, heldout = _calibration(model, tokenizer, cfg, calibration, attention_mask, heldout)
    if cfg.structured:
        dense = copy.deepcopy(model) if cfg.reconstruct.enabled else None
        structure = prune_structured(model, adapter, ids, cfg, attention_mask=attention_mask, progress=progress)
        reconstruction = None if dense is None else reconstruct_structured(
            model, dense, structure, ids, heldout, cfg, attention_mask, progress)
        return {"layers": [], "sparsity": None, "reconstruction": reconstruction, "structure": structure,
                "retraining": _retrain(model, tokenizer, cfg, calibration, adapter.prunable_weights(), progress)}
    zeros_before = count_zeros(adapter.prunable_weights())
    reconstruction = None
    if cfg.reconstruct.enabled:
        layers, reconstruction = prune_and_reconstruct(model, adapter, ids, heldout, cfg, attention_mask=attention_mask,
                                                       progress=progress)
    else:
        layers = prune_model(model, adapter, ids, cfg, attention_mask=attention_mask, progress=progress)
    # the weights read again: a model held in bfloat16 was reconstructed in float32, its parameters given new tensors
    retraining = _retrain(model, tokenizer, cfg, calibration, adapter.prunable_weights(), progress)
    return {"layers": layers, "sparsity": measure_sparsity(adapter.prunable_weights(), zeros_before),
            "reconstruction": reconstruction, "retraining": retraining}


def _retrain(model, tokenizer, cfg: RunConfig, calibration, weights: dict, progress: bool) -> dict | None:
    if not cfg.retrain.enabled:
        return None
    text = load_text(calibration if isinstance(calibration, str) else cfg.calib, role="calib")
    ids, held, _ = retraining_data(cfg, tokenizer, text)
    merged, record = retrain(model, weights, cfg, ids, held, progress)
    if merged is not model:  # PEFT's merge_and_unload hands back the model it wrapped
        raise PrunelabError("internal error: retraining returned another model object")
    return record


def perplexity(model, windows: torch.Tensor, batch_size: int = 2, progress: bool = True) -> dict:
    """exp(mean next-token NLL) of `model` over `windows`, [n, seqlen] token ids, each scored on its own (no context
    carried across windows, no BOS added), in eval mode; returns {"perplexity", "nll", "predicted_tokens"}."""
    check_loaded(model)
    check_token_ids(windows, embedding_rows(model), "windows")
    if windows.shape[1] < 2:
        raise PrunelabError(f"windows must hold 2 tokens or more each (the first is context only), got "
                            f"{windows.shape[1]}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise PrunelabError(f"batch_size must be a positive integer, got {batch_size!r}")
    with evaluating(model):
        return window_perplexity(model, windows, batch_size, progress)


def run(config: RunConfig | dict | None = None, progress: bool = True, **overrides: Any) -> dict:
    """Run a whole job (load, prune, evaluate, save) as `prunelab run` does; returns its report."""
    if isinstance(overrides.get("model"), torch.nn.Module):
        raise PrunelabError("prunelab.run loads its model by name or path (and saves it); prune a loaded model with "
                            "prunelab.prune(model, tokenizer, ...)")
    with autograd_on():
        return run_job(as_config(config, **overrides), progress=progress)
