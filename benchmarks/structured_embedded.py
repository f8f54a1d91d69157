"""Depth (Prune&Comp) and width (FLAP) pruning of the embedded SmolLM2-135M: perplexity, parameters,
generation tokens/s before and after, pruning time.

Each configuration runs `prunelab run` in a fresh process (one at a time: tokens/s needs the CPU
to itself), calibration from `web`, perplexity on the first 40 × 512-token windows of `wiki`.
Finished runs are kept in --out and skipped when the script is run again. Usage:

    python benchmarks/structured_embedded.py [--threads 2] [--samples 32] [--only bi-6-comp,flap-20-bias]

The ppl metric's runs use 8 calibration windows (it costs O(blocks²) block passes per removal).

Run names: <metric>-<blocks>-<comp|nocomp>[-oneshot] for layer removal, flap-<percent>-<bias|nobias>,
and <name>-recon for attn-mlp reconstruction after a few of them (the stage times are in each report).
Tokens/s here is measured in each run (dense before pruning, pruned after); for figures less exposed to
load changes on a shared machine, time the saved folders alternately with benchmarks/generation_speed.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

PPL_SAMPLES = 8  # the ppl metric runs the blocks after each candidate for every round: O(blocks²) passes


def runs() -> dict[str, list[str]]:
    """Every configuration: pruning alone (the ppl metric, by far the slowest, last), then with reconstruction."""
    found = {}

    def layers(metric: str, blocks: int, comp: bool, one_shot: bool = False) -> None:
        name = f"{metric}-{blocks}-{'comp' if comp else 'nocomp'}{'-oneshot' if one_shot else ''}"
        found[name] = ["--method", "layers", "--metric", metric, "--remove", str(blocks),
                       "--compensation" if comp else "--no-compensation", *(["--one-shot"] if one_shot else []),
                       *(["--samples", str(PPL_SAMPLES)] if metric == "ppl" else [])]

    for blocks in (3, 6):
        for metric in ("bi", "cl", "taylor", "mag"):
            for comp in (True, False):
                layers(metric, blocks, comp)
        for metric in ("bi", "taylor"):  # iterative vs one shot (cl is one shot by construction)
            layers(metric, blocks, True, one_shot=True)
    for ratio in (20, 30):
        for bias in (True, False):
            found[f"flap-{ratio}-{'bias' if bias else 'nobias'}"] = [
                "--method", "flap", "--ratio", str(ratio / 100),
                "--bias-compensation" if bias else "--no-bias-compensation",
            ]
    for blocks in (6, 3):
        for comp in (True, False):
            layers("ppl", blocks, comp)
    # attn-mlp reconstruction after the compensated variants (the blocks next to each cut, every narrowed
    # block), cheapest pruning first
    for name in (
        "bi-3-comp", "bi-6-comp", "taylor-6-comp", "flap-20-bias", "flap-30-bias", "cl-3-comp", "cl-6-comp",
        "mag-3-comp", "mag-6-comp", "taylor-3-comp", "ppl-3-comp", "ppl-6-comp",
    ):
        found[f"{name}-recon"] = [*found[name], "--reconstruct", "attn-mlp"]
    return found


def run(name: str, flags: list[str], out: Path, common: list[str]) -> dict:
    folder = out / name
    if (folder / "prunelab.json").is_file():
        return json.loads((folder / "prunelab.json").read_text())
    result = subprocess.run(
        [
            sys.executable, "-m", "prunelab.cli", "run", *common, "--reconstruct", "none", *flags, "--no-eval-dense",
            "--out", str(folder), "--overwrite",
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-2000:]}")
    return json.loads((folder / "prunelab.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=32, help="calibration windows of 512 tokens")
    parser.add_argument("--only", default="", help="comma-separated run names")
    parser.add_argument("--out", type=Path, default=Path("runs/structured"))
    args = parser.parse_args()
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    common = [
        "--model", "smollm2", "--calib", "web", "--samples", str(args.samples), "--seqlen", "512", "--eval", "wiki",
        "--eval-windows", "40", "--eval-seqlen", "512", "--threads", str(args.threads),
        "--precision", "float32",  # the documented reconstructions ran in float32
    ]
    print(
        "| run | removed | perplexity | parameters | tokens/s before → after | speed-up | pruning time (s) "
        "| reconstruction time (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, flags in runs().items():
        if only and name not in only:
            continue
        report = run(name, flags, args.out, common)
        structure, metrics = report["structure"], report["metrics"]
        before, after = metrics["speed_dense"]["tokens_per_second"], metrics["speed"]["tokens_per_second"]
        removed = ", ".join(map(str, structure["removed"])) if "removed" in structure else "–"
        print(
            f"| {name} | {removed} | {metrics['pruned']['perplexity']:.2f} | {structure['parameters_after']:,} "
            f"| {before:.1f} → {after:.1f} | {after / before:.2f}× | {report['stages']['prune']['seconds']:.0f} "
            f"| {report['stages'].get('reconstruct', {}).get('seconds', 0):.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
