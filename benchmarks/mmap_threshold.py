"""What glibc's mmap threshold during a streamed run costs and saves: one streamed `prunelab.run` per
threshold, printing the prune(+reconstruct) stage's seconds and peak RSS and the held-out losses.

    PYTHONPATH=src python benchmarks/mmap_threshold.py --model /tmp/m2 --calib /tmp/text/calib.txt \
        --modes 128 1024 4096 heap [--samples 4] [--no-reconstruct]

`--model` is a folder larger than `--max-memory` (the 8B benchmark model cut to 2 blocks, its shards
symlinked, in docs/RESULTS.md). A mode is a threshold in KiB, or `heap` for glibc's own rising threshold.
Each mode runs in a fresh process: the threshold, once set, stays fixed for the process.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import subprocess
import sys
import tempfile


def one(args) -> None:
    import prunelab.job as job
    from prunelab import measure, run

    if args.mode == "heap":
        @contextlib.contextmanager
        def unmapped():
            yield False
        job.large_allocations_mapped = unmapped
    else:
        job.large_allocations_mapped = functools.partial(measure.large_allocations_mapped, int(args.mode) * 1024)
    with tempfile.TemporaryDirectory() as out:
        report = run(dict(model=args.model, method="wanda", sparsity=0.5, samples=args.samples, seqlen=512,
                          calib=args.calib, eval="none", max_memory=args.max_memory, threads=2, out=out + "/o",
                          reconstruct={"lr": 1e-4, "heldout": 2} if args.reconstruct else "none"), progress=False)
    stage = report["stages"]["prune+reconstruct" if args.reconstruct else "prune"]
    losses = [round(s["loss_heldout_after"], 6) for s in (report["reconstruction"] or {}).get("submodels", [])]
    print(json.dumps({"mode": args.mode, "seconds": stage["seconds"], "peak_rss_gb": stage["peak_rss_gb"],
                      "mapped": report["model"]["streamed"]["large_allocations_mapped"], "heldout_after": losses}),
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True)
    parser.add_argument("--modes", nargs="+", default=["128", "1024", "4096", "heap"])
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-memory", type=float, default=2.0)
    parser.add_argument("--no-reconstruct", dest="reconstruct", action="store_false")
    args = parser.parse_args()
    if args.mode is not None:
        return one(args)
    for mode in args.modes:
        command = [sys.executable, __file__, "--mode", mode, "--model", args.model, "--calib", args.calib,
                   "--samples", str(args.samples), "--max-memory", str(args.max_memory)]
        subprocess.run(command + ([] if args.reconstruct else ["--no-reconstruct"]), check=True)


if __name__ == "__main__":
    main()
