"""prunelab against llm-compressor, side by side: time, peak memory and perplexity on the same windows.

llm-compressor is never a dependency of prunelab: this script builds it in a venv of its own (torch
pinned to the version prunelab runs with, so both use the same kernels) and runs its Wanda and
SparseGPT `oneshot` on the very token windows prunelab calibrates on (128 × 512 from `web`, seed 0,
saved from prunelab's own window drawing). Every configuration runs in a fresh process, one at a
time. The peer's time is its `oneshot` call, its peak RSS the process's lifetime maximum (it
evaluates nothing); prunelab's are the prune (or prune+reconstruct) stage of `prunelab run`. Every
model, the peer's included, is evaluated by `prunelab eval` under one protocol, on each evaluation
text given. Usage:

    python benchmarks/peer_llmcompressor.py [--threads 2] [--eval wiki,new-wiki] [--only peer-wanda,...]
        [--venv DIR] [--keep DIR]

Rows: peer-wanda, peer-sparsegpt (llm-compressor, prune only), wanda, sparsegpt (prunelab, prune
only), wanda+recon (prunelab's default: Wanda 50 % + attn-mlp reconstruction).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from cli_runs import prunelab  # benchmarks/cli_runs.py (a script's folder is on its path)

PEER = "llmcompressor==0.14.0"
ROWS = ("peer-wanda", "peer-sparsegpt", "wanda", "sparsegpt", "wanda+recon")

# Runs in the peer's venv: prune with oneshot on the saved windows, report time and peak RSS, save.
PEER_WORKER = r"""
import json, resource, sys, time
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

model_dir, windows_file, method, sparsity, threads, out = sys.argv[1:7]
torch.set_num_threads(int(threads))
ids = torch.load(windows_file)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(model_dir)
modifier = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[method]
recipe = modifier(sparsity=float(sparsity), mask_structure="0:0", targets=["Linear"], ignore=["re:.*lm_head"])
data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
start = time.perf_counter()
oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1])
seconds = time.perf_counter() - start
model.save_pretrained(out, save_compressed=False)
tokenizer.save_pretrained(out)
import llmcompressor
print("PEER " + json.dumps({"seconds": seconds, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                            "version": llmcompressor.__version__, "torch": torch.__version__}))
"""


def peer_python(venv: Path) -> Path:
    """The peer venv's interpreter, built on first use (torch as prunelab's, then llm-compressor)."""
    import torch

    python = venv / "bin" / "python"
    if not python.exists():
        print(f"building {PEER} in {venv} (once)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}"], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", PEER], check=True)
    return python


def calibration_ids(samples: int, seqlen: int, seed: int, path: Path) -> Path:
    """The windows `prunelab run` calibrates on by default (the training ones; held-out ones come after)."""
    import torch
    from transformers import AutoTokenizer

    from prunelab.data.sources import load_text
    from prunelab.data.windows import calibration_windows
    from prunelab.models.loading import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    ids, _, _ = calibration_windows(tokenizer, load_text("web"), samples, seqlen, seed)
    torch.save(ids, path)
    return path


def perplexities(model: str, texts: list[str], threads: int) -> dict[str, float]:
    return {text: prunelab("eval", "--model", model, "--eval", text, "--eval-windows", "40", "--eval-seqlen", "512",
                           "--threads", str(threads))["perplexity"] for text in texts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval", default="wiki,new-wiki", help="evaluation texts, comma-separated")
    parser.add_argument("--only", default="", help=f"comma-separated rows of {', '.join(ROWS)}")
    parser.add_argument("--venv", type=Path, default=Path.home() / ".cache" / "prunelab" / "peer-llmcompressor-0.14.0")
    parser.add_argument("--keep", type=Path, default=None, help="keep the pruned models in this folder")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    args = parser.parse_args()
    texts = [t.strip() for t in args.eval.split(",") if t.strip()]
    rows = [r.strip() for r in args.only.split(",") if r.strip()] or list(ROWS)
    unknown = set(rows) - set(ROWS)
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; choose from {', '.join(ROWS)}")

    from prunelab.models.loading import embedded_model_dir

    model_dir = embedded_model_dir()
    threads = str(args.threads)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        work = args.keep or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        results["dense"] = {"ppl": perplexities("smollm2", texts, args.threads)}
        if any(r.startswith("peer-") for r in rows):
            python = peer_python(args.venv)
            windows = calibration_ids(args.samples, args.seqlen, 0, work / "windows.pt")
            env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}  # the peer as users run it
        for row in rows:
            out = work / row
            if row.startswith("peer-"):
                done = subprocess.run([python, "-c", PEER_WORKER, str(model_dir), str(windows), row[5:], "0.5", threads,
                                       str(out)], capture_output=True, text=True, env=env)
                lines = [line for line in done.stdout.splitlines() if line.startswith("PEER ")]
                if done.returncode != 0 or not lines:
                    raise SystemExit(f"{row} failed:\n{done.stderr[-3000:]}")
                results[row] = json.loads(lines[-1][5:])
            else:
                method = row.split("+")[0]
                report = prunelab("run", "--model", "smollm2", "--method", method, "--sparsity", "0.5",
                                  "--samples", str(args.samples), "--seqlen", str(args.seqlen), "--threads", threads,
                                  "--reconstruct", "attn-mlp" if row.endswith("+recon") else "none", "--eval", "none",
                                  "--no-eval-dense", "--out", str(out), "--overwrite")
                stage = report["stages"]["prune+reconstruct" if row.endswith("+recon") else "prune"]
                results[row] = {"seconds": stage["seconds"], "peak_rss_gb": stage["peak_rss_gb"]}
            results[row]["ppl"] = perplexities(str(out), texts, args.threads)
            print(f"{row}: {results[row]}", file=sys.stderr)

    base = results.get("peer-wanda", {}).get("seconds")
    print(f"| run | time | × peer Wanda | peak RSS | {' | '.join(f'ppl {t}' for t in texts)} |")
    print("|---|---|---|---|" + "---|" * len(texts))
    for row, r in results.items():
        time = f"{r['seconds']:.0f} s" if "seconds" in r else "–"
        ratio = f"{r['seconds'] / base:.2f}" if base and "seconds" in r else "–"
        rss = f"{r['peak_rss_gb']:.2f} GB" if "peak_rss_gb" in r else "–"
        ppl = " | ".join(f"{r['ppl'][t]:.2f}" for t in texts)
        print(f"| {row} | {time} | {ratio} | {rss} | {ppl} |")


if __name__ == "__main__":
    main()
