"""Perplexity over non-overlapping windows: exp(mean next-token NLL over every predicted token)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(
    model, windows: torch.Tensor, batch_size: int = 2, progress: bool = True, desc: str = "perplexity"
) -> dict:
    """Each window is scored on its own (no context carried across windows, no BOS added)."""
    device = next(model.parameters()).device
    nll, predicted = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc=desc, unit="batch", disable=not progress):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        nll += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum").item()
        predicted += batch[:, 1:].numel()
    mean_nll = nll / predicted
    return {"perplexity": math.exp(mean_nll), "nll": mean_nll, "predicted_tokens": predicted}
