"""Generation tokens/s of saved pruned models against their dense model, measured alternately.

`prunelab run` times the dense model before pruning and the pruned one after, minutes apart in
the same process; on a shared machine the load can change in between. Here the dense model and
every pruned folder stay loaded and are timed in turn, round after round, so a slow minute hits
all of them alike; each figure is the median over rounds and the speed-up is the median of the
per-round ratios. Usage:

    python benchmarks/generation_speed.py runs/structured/bi-6-comp runs/structured/flap-30-bias \
        [--dense smollm2] [--rounds 7] [--tokens 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from prunelab.evaluate.sparsity import parameter_count
from prunelab.evaluate.speed import generation_speed
from prunelab.models.loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pruned", nargs="+", type=Path, help="folders written by `prunelab run`")
    parser.add_argument("--dense", default="smollm2", help="model the folders were pruned from")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per generation")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    models = {"dense": load_model(args.dense, "float32", "cpu")[:2]}
    for folder in args.pruned:
        models[folder.name] = load_model(str(folder), "float32", "cpu")[:2]
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, (model, tokenizer) in models.items():
            timing = generation_speed(model, tokenizer, new_tokens=args.tokens, repeats=1)
            seconds[name].append(timing["seconds"][0])

    print(f"{args.rounds} rounds × {args.tokens} new tokens, batch 1, greedy, {args.threads} threads")
    print("| model | parameters | tokens/s (median) | speed-up (median of per-round ratios) |")
    print("|---|---|---|---|")
    for name, (model, _) in models.items():
        ratios = [dense / own for dense, own in zip(seconds["dense"], seconds[name])]
        print(f"| {name} | {parameter_count(model):,} | {args.tokens / statistics.median(seconds[name]):.1f} "
              f"| {statistics.median(ratios):.2f}× (range {min(ratios):.2f}–{max(ratios):.2f}) |")


if __name__ == "__main__":
    main()
