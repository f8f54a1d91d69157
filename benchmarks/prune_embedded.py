"""Prune the embedded SmolLM2-135M with every criterion and pattern; print time, memory, perplexity.

Each configuration runs `prunelab run` in a fresh process (so peak memory is its own), with
128 × 512 calibration tokens from `web` and perplexity on the first 40 × 512-token windows of
`wiki` (no BOS). Usage:

    python benchmarks/prune_embedded.py [--threads 2] [--only wanda-50,sparsegpt-2:4] [--bf16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from cli_runs import prunelab  # benchmarks/cli_runs.py (a script's folder is on its path)

RUNS = [
    ("magnitude", "50%"), ("wanda", "50%"), ("sparsegpt", "50%"),
    ("magnitude", "2:4"), ("wanda", "2:4"), ("sparsegpt", "2:4"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated method-target names, e.g. wanda-50%%,sparsegpt-2:4")
    parser.add_argument("--bf16", action="store_true", help="also run Wanda and SparseGPT with bfloat16 forward passes")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    args = parser.parse_args()
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    runs = [(m, t, "float32") for m, t in RUNS]
    if args.bf16:
        runs += [(m, t, "bfloat16") for m, t in RUNS if m != "magnitude"]
    common = ["--threads", str(args.threads)]

    rows = []
    if not only or "dense" in only:
        dense = prunelab(
            "eval", "--model", "smollm2", "--eval", "wiki", "--eval-windows", "40", "--eval-seqlen", "512", *common
        )
        rows.append(("dense", "–", "–", "–", f"{dense['perplexity']:.2f}"))
        print(f"dense: ppl {dense['perplexity']:.2f}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as scratch:
        for method, target, dtype in runs:
            name = f"{method}-{target}"
            if only and name not in only:
                continue
            shape = ["--pattern", target] if ":" in target else ["--sparsity", str(float(target.rstrip("%")) / 100)]
            report = prunelab(
                "run", "--model", "smollm2", "--method", method, *shape, "--calib", "web", "--samples",
                str(args.samples), "--seqlen", str(args.seqlen), "--eval", "wiki", "--eval-windows", "40",
                "--eval-seqlen", "512", "--no-eval-dense", "--dtype", dtype, "--reconstruct", "none", "--out",
                str(Path(scratch) / f"{name}-{dtype}".replace(":", "of")), *common,
            )
            prune = report["stages"]["prune"]
            ppl = report["metrics"]["pruned"]["perplexity"]
            rows.append(
                (f"{method} {target}", dtype, f"{prune['seconds']:.0f}", f"{prune['peak_rss_gb']:.2f}", f"{ppl:.2f}")
            )
            print(
                f"{name} {dtype}: {prune['seconds']:.0f} s, {prune['peak_rss_gb']:.2f} GB, ppl {ppl:.2f}",
                file=sys.stderr,
            )

    print("| run | forward dtype | pruning wall time (s) | peak RSS while pruning (GB) | perplexity |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
