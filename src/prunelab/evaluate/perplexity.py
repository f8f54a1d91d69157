"""Perplexity over non-overlapping windows: exp(mean next-token NLL over every predicted token)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..distributed import all_sum_float


def summed_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Σ −log p(ids[t+1] | ids[≤t]) over every predicted token of the windows."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")


@torch.no_grad()
def perplexity(
    model, windows: torch.Tensor, batch_size: int = 2, progress: bool = True, desc: str = "perplexity"
) -> dict:
    """Each window is scored on its own (no context carried across windows, no BOS added)."""
    device = next(model.parameters()).device
    nll, predicted = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc=desc, unit="batch", disable=not progress):
        batch = batch.to(device)
        nll += summed_nll(model(input_ids=batch, use_cache=False).logits, batch).item()
        predicted += batch[:, 1:].numel()
    nll, predicted = all_sum_float(nll), int(all_sum_float(predicted))  # data parallel: every process's windows
    mean_nll = nll / predicted
    return {"perplexity": math.exp(mean_nll), "nll": mean_nll, "predicted_tokens": predicted}
