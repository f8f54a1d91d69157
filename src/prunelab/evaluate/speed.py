"""Generation throughput: what structured pruning buys at inference."""

from __future__ import annotations

import time

import torch

PROMPT = "The history of the region begins with"


@torch.no_grad()
def generation_speed(model, tokenizer, new_tokens: int = 64, repeats: int = 3) -> dict:
    """Greedy generation of `new_tokens` tokens after a short prompt, batch 1, KV cache on;
    the median of `repeats` timed runs after one warm-up."""
    device = next(model.parameters()).device
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids.to(device)
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True,
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    model.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    return {
        "tokens_per_second": round(new_tokens / seconds, 2),
        "new_tokens": new_tokens,
        "prompt_tokens": ids.shape[1],
        "batch": 1,
        "repeats": repeats,
        "seconds": [round(t, 3) for t in times],
    }
