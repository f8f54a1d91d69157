"""Data parallel against one process on the embedded model: Wanda 50 % + attn-mlp reconstruction on a few
windows, once in one process and once as `--processes` gloo processes under torchrun (each with
`--threads` / processes threads). Prints both perplexities, the share of mask entries that differ and
the relative difference of the weights.

    PYTHONPATH=src python benchmarks/ddp_embedded.py [--samples 16] [--processes 2] [--threads 2] [prunelab run options]

Other options go to `prunelab run` (`--calib FILE --eval FILE` where the embedded text is not cached).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args, passed = parser.parse_known_args()
    common = ["run", "--samples", str(args.samples), "--batch-size", str(args.processes), "--no-eval-dense",
              "--precision", "float32", *passed]
    with tempfile.TemporaryDirectory() as tmp:
        one, many = Path(tmp) / "one", Path(tmp) / "many"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "prunelab", *common, "--threads", str(args.threads), "--out", str(one)],
                       check=True, capture_output=True)
        print(f"1 process: {time.perf_counter() - start:.0f} s", flush=True)
        start = time.perf_counter()
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, args.threads // args.processes)))
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                               str(args.processes), "-m", "prunelab", *common, "--out", str(many)],
                              env=env, capture_output=True, text=True)
        if done.returncode:
            sys.exit(done.stderr[-3000:])
        print(f"{args.processes} processes: {time.perf_counter() - start:.0f} s", flush=True)
        reports = [json.loads((d / "prunelab.json").read_text()) for d in (one, many)]
        a, b = load_file(one / "model.safetensors"), load_file(many / "model.safetensors")
        names = list(reports[0]["sparsity"]["layers"])
        differ = sum(int(((a[n] == 0) != (b[n] == 0)).sum()) for n in names)
        total = sum(a[n].numel() for n in names)
        relative = max(float((a[n] - b[n]).norm() / a[n].norm()) for n in names)
        ppl = [r["metrics"]["pruned"]["perplexity"] for r in reports]
        print(f"perplexity 1 process {ppl[0]:.3f}, {args.processes} processes {ppl[1]:.3f} "
              f"({100 * (ppl[1] / ppl[0] - 1):+.2f} %); lr {reports[0]['reconstruction']['lr']['lr']} / "
              f"{reports[1]['reconstruction']['lr']['lr']}")
        print(f"mask entries that differ: {differ} of {total} ({100 * differ / total:.4f} %); largest relative "
              f"weight difference of a layer {relative:.2e}; identical masks in "
              f"{sum(torch.equal(a[n] == 0, b[n] == 0) for n in names)} of {len(names)} layers")


if __name__ == "__main__":
    main()
