"""Peak memory and time: local reconstruction (attn-mlp) against full retraining and MaskLoRA, on a
Llama-shaped model built from a config (random weights, no downloads), same windows for every method.

Each method runs in its own process (so that one's peak cannot hide in another's): Wanda 50 % on
`--windows` × `--seqlen` random token windows, then

    recon      attn-mlp reconstruction (fixed lr 1e-3, mixed propagation, the defaults otherwise)
    full       full retraining, batch 4 × accumulate 2 windows per step, lr 1e-5
    masklora   MaskLoRA (rank 16, alpha 32), same batches, lr 1e-3

Retraining's memory is the same at every step (one micro-batch's activations, the gradients and AdamW's
state), so `--steps` caps its steps on slow machines without changing the peak; reconstruction always runs
over the whole model and every window. Memory is the stage's peak RSS (CPU) or peak allocated (CUDA).

    PYTHONPATH=src python benchmarks/retrain_memory.py [--shape 0.45b|135m] [--device cpu|cuda] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
import transformers

import prunelab
from prunelab.config import RunConfig
from prunelab.measure import stage
from prunelab.models.adapters import find_adapter
from prunelab.recover import retrain

SHAPES = {  # Llama family, tied embeddings, vocabulary of SmolLM2
    "135m": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                 num_hidden_layers=30),
    "0.45b": dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8,
                  num_hidden_layers=32),
}


def build(shape: str, device: str):
    config = transformers.LlamaConfig(vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048,
                                      **SHAPES[shape])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
    model.config.use_cache = False
    return model.eval()


def one(method: str, shape: str, device: str, windows: int, seqlen: int, steps: int | None) -> dict:
    model = build(shape, device)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (windows, seqlen), generator=generator)
    held = torch.randint(0, 49152, (16, seqlen), generator=generator)
    stages: dict = {}
    params = sum(p.numel() for p in model.parameters())
    if method == "recon":
        with stage("prune+reconstruct", stages):
            prunelab.prune(model, calibration=ids, heldout=held, method="wanda", sparsity=0.5, forward_batch=8,
                           reconstruct={"lr": 1e-3}, progress=False)
        return {"method": method, "parameters": params, **stages["prune+reconstruct"]}
    with stage("prune", stages):
        prunelab.prune(model, calibration=ids, method="wanda", sparsity=0.5, forward_batch=8, reconstruct="none",
                       progress=False)
    train = ids if steps is None else ids[: steps * 8]
    cfg = RunConfig(seqlen=seqlen, reconstruct="none", retrain={
        "method": method, "tokens": train.numel(), "lr": 1e-5 if method == "full" else 1e-3, "evals": 1})
    with stage("retrain", stages):
        _, record = retrain(model, find_adapter(model).prunable_weights(), cfg, train, held, progress=False)
    return {"method": method, "parameters": params, "steps": record["steps"], **stages["retrain"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="0.45b", choices=list(SHAPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--steps", type=int, default=None, help="cap on retraining steps (default: every window)")
    parser.add_argument("--methods", nargs="*", default=["recon", "full", "masklora"])
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.shape, args.device, args.windows, args.seqlen, args.steps)))
        return
    print(f"torch {torch.__version__}, {args.device}, shape {args.shape}, {args.windows} x {args.seqlen} windows",
          flush=True)
    results = {}
    for method in args.methods:
        argv = [sys.executable, __file__, "--one", method, *sys.argv[1:]]
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode:
            print(f"{method}: failed\n{done.stderr[-2000:]}", flush=True)
            continue
        results[method] = json.loads(done.stdout.strip().splitlines()[-1])
        r = results[method]
        cuda = f", CUDA peak {r['cuda_peak_gb']:.2f} GB" if "cuda_peak_gb" in r else ""
        print(f"{method}: {r['parameters'] / 1e6:.0f} M parameters, {r['seconds']:.1f} s"
              f"{', ' + str(r['steps']) + ' steps' if 'steps' in r else ''}, peak RSS {r['peak_rss_gb']:.2f} GB{cuda}",
              flush=True)
    if "recon" in results:
        key = "cuda_peak_gb" if "cuda_peak_gb" in results["recon"] else "peak_rss_gb"
        for method in ("full", "masklora"):
            if method in results:
                print(f"recon / {method} peak ({key}): {results['recon'][key] / results[method][key]:.3f}")


if __name__ == "__main__":
    main()
