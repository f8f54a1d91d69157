"""The run's record: `prunelab.json` for machines, `REPORT.md` for people."""

from __future__ import annotations

import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("prunelab", "torch", "transformers", "accelerate", "safetensors", "datasets"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    found["torch_threads"] = str(torch.get_num_threads())
    found["GLIBC_TUNABLES"] = os.environ.get("GLIBC_TUNABLES", "")
    return found


def _ppl(metrics: dict, key: str) -> str:
    return f"{metrics[key]['perplexity']:.2f}" if key in metrics else "–"


def summary_rows(report: dict) -> list[tuple[str, str]]:
    cfg, metrics, stages = report["config"], report["metrics"], report["stages"]
    sparsity = report["sparsity"]
    prune = stages.get("prune", {})
    rows = [
        ("model", report["model"]["source"]),
        ("method", f"{cfg['method']} {cfg['pattern'] or format(cfg['sparsity'], '.0%')}"),
        ("sparsity (pruned linears)", f"{sparsity['sparsity']:.2%} (zeros before pruning {sparsity['sparsity_before']:.2%})"),
        ("perplexity dense", _ppl(metrics, "dense")),
        ("perplexity pruned", _ppl(metrics, "pruned")),
        ("pruning time", f"{prune.get('seconds', 0):.1f} s"),
        ("peak RSS while pruning", f"{prune.get('peak_rss_gb', 0):.2f} GB"),
    ]
    if report.get("output"):
        rows.append(("saved to", report["output"]))
    return rows


def to_markdown(report: dict) -> str:
    lines = ["# prunelab run", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary_rows(report)]
    ev = report["data"].get("evaluation")
    if ev:
        lines += ["", "## Evaluation protocol", "",
                  f"{ev['windows']} non-overlapping windows of {ev['seqlen']} tokens ({ev['tokens']} tokens) from "
                  f"`{ev['source']}` ({ev['description']}), no BOS, perplexity = exp(mean NLL of every predicted token)."]
    cal = report["data"].get("calibration")
    if cal:
        lines += ["", "## Calibration", "",
                  f"{cal['samples']} windows × {cal['seqlen']} tokens drawn with seed {cal['seed']} from `{cal['source']}` "
                  f"({cal['description']}, {cal['text_tokens']} tokens); window starts are in prunelab.json."]
    lines += ["", "## Stages", "", "| stage | seconds | peak RSS (GB) |", "|---|---|---|"]
    lines += [f"| {name} | {s['seconds']:.1f} | {s['peak_rss_gb']:.2f} |" for name, s in report["stages"].items()]
    lines += ["", "## Sparsity per layer (measured on the saved tensors)", "",
              "| tensor | shape | sparsity | zeros before pruning |", "|---|---|---|---|"]
    for name, entry in report["sparsity"]["layers"].items():
        shape = "×".join(map(str, entry["shape"]))
        lines.append(f"| {name} | {shape} | {entry['sparsity']:.2%} | {entry.get('zeros_before', 0)} |")
    retries = [r for r in report["layers"] if r.get("damp_retries")]
    fallbacks = [r for r in report["layers"] if r.get("fallback")]
    if retries or fallbacks:
        lines += ["", "## Notes", ""]
        lines += [f"- block {r['block']} {r['layer']}: Cholesky needed damping {r['damp']:g} ({r['damp_retries']} retries)" for r in retries]
        lines += [f"- block {r['block']} {r['layer']}: {r['fallback']}" for r in fallbacks]
    lines += ["", "## Versions", "", "```", json.dumps(report["versions"], indent=1), "```", ""]
    return "\n".join(lines)


def write(report: dict, folder: Path) -> None:
    (folder / "prunelab.json").write_text(json.dumps(report, indent=1))
    (folder / "REPORT.md").write_text(to_markdown(report))
