"""The run's record: `prunelab.json` for machines, `REPORT.md` for people."""

from __future__ import annotations

import json
import math
import os
import platform
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TypedDict

import torch

from .config import pruning_target
from .evaluate.zeroshot import means
from .measure import StageRecord


class Report(TypedDict):
    """Everything a run decided and measured: `prunelab.json`, and the source of REPORT.md and study tables."""

    config: dict  # RunConfig.to_dict(): pass the file back as --config to redo the run
    model: dict  # source, family, class, parameters, blocks
    data: dict  # "calibration" / "evaluation": source, sha256 of the text, windows, seed, window starts
    metrics: dict  # "dense" / "pruned": perplexity, nll, predicted_tokens; "speed_dense" / "speed"
    sparsity: dict | None  # measured on the tensors (after a save: read back from the files); None if structured
    stages: dict[str, StageRecord]
    layers: list[dict]  # one pruning record per layer
    reconstruction: dict | None
    structure: dict | None  # layer removal or FLAP
    retraining: dict | None  # full or MaskLoRA: lr, steps, tokens, loss curve
    versions: dict[str, str]
    output: str | None


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("prunelab", "torch", "transformers", "accelerate", "safetensors", "datasets", "matplotlib",
                    "peft", "lm_eval"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    found["torch_threads"] = str(torch.get_num_threads())
    found["GLIBC_TUNABLES"] = os.environ.get("GLIBC_TUNABLES", "")
    return found


def _ppl(metrics: dict, key: str) -> str:
    return f"{metrics[key]['perplexity']:.2f}" if key in metrics else "–"


def accuracy(value: float | None) -> str:
    """An accuracy to four places; a dash where the task defines no such metric (lm-eval scores binary choices
    such as boolq by acc only)."""
    return "–" if value is None else f"{value:.4f}"


def mean_accuracies(zeroshot: dict) -> tuple[str, str]:
    """Mean acc, and mean acc_norm naming how many tasks it covers when some define none (recomputed from the
    tasks, so reports written before acc_norm's mean skipped such tasks read the same)."""
    if not zeroshot.get("tasks"):
        return "–", "–"
    summary = means(zeroshot["tasks"])
    covered, total = summary["acc_norm_tasks"], len(zeroshot["tasks"])
    of = f" ({covered} of {total} tasks)" if 0 < covered < total else ""
    return accuracy(summary["mean_acc"]), f"{accuracy(summary.get('mean_acc_norm'))}{of}"


def zeroshot_means(zeroshot: dict) -> str:
    return " / ".join(mean_accuracies(zeroshot))


def summary_rows(report: Report) -> list[tuple[str, str]]:
    cfg, metrics, stages = report["config"], report["metrics"], report["stages"]
    sparsity = report["sparsity"]
    recon = report.get("reconstruction")
    name = "prune+reconstruct" if "prune+reconstruct" in stages else "prune"
    prune = stages.get(name, {})
    model = report["model"]["source"] + (f" (dequantized from {report['model']['dequantized_from']})"
                                         if "dequantized_from" in report["model"] else "")
    rows = [("model", model), ("method", method_label(cfg)),
            ("reconstruction", _recon_label(cfg["reconstruct"], recon))]
    if sparsity is not None:
        rows.append(
            (
                "sparsity (pruned linears)",
                f"{sparsity['sparsity']:.2%} (zeros before pruning {sparsity['sparsity_before']:.2%})",
            )
        )
        dense = sum(1 for r in report.get("layers", []) if r.get("skipped"))
        if dense:
            rows.append(("kept dense (skip)", f"{dense} layers matching {', '.join(cfg['skip'])}; counted above"))
        if cfg.get("permute"):
            rows.append(("channels permuted", _permuted_label(report.get("layers", []))))
    structure = report.get("structure")
    if structure:
        if "blocks_before" in structure:
            rows.append(
                (
                    "blocks removed",
                    f"{', '.join(map(str, structure['removed']))} "
                    f"({structure['blocks_before']} → {structure['blocks_after']} blocks)",
                )
            )
        rows.append(("parameters", f"{structure['parameters_before']:,} → {structure['parameters_after']:,}"))
        if "speed" in metrics:
            before = metrics.get("speed_dense", {}).get("tokens_per_second")
            rows.append(
                ("generation tokens/s", f"{before} → {metrics['speed']['tokens_per_second']} (batch 1, greedy)")
            )
    rows += [
        ("perplexity dense", _ppl(metrics, "dense")),
        ("perplexity pruned" + (" + reconstructed" if recon else "") + (" + retrained" if report.get("retraining")
                                                                        else ""), _ppl(metrics, "pruned")),
        (f"{name} time", f"{prune.get('seconds', 0):.1f} s"),
        (f"peak RSS ({name})", f"{prune.get('peak_rss_gb', 0):.2f} GB"),
    ]
    if "reconstruct" in stages:
        rows.append(("reconstruct time", f"{stages['reconstruct']['seconds']:.1f} s"))
    rows += _retraining_rows(report.get("retraining"), stages)
    for key, label in (("zeroshot_dense", "zero-shot mean acc / acc_norm dense"),
                       ("zeroshot", "zero-shot mean acc / acc_norm")):
        if key in metrics:
            rows.append((label, zeroshot_means(metrics[key])))
    if prune.get("cuda_peak_gb"):
        rows.append((f"peak CUDA memory ({name})", f"{prune['cuda_peak_gb']:.2f} GB"))
    if report.get("output"):
        saved = report["model"].get("saved_dtype")
        rows.append(("saved to", report["output"] + (f" ({saved})" if saved else "")))
    return rows


def _retraining_rows(retraining: dict | None, stages: dict) -> list[tuple[str, str]]:
    if not retraining:
        return []
    lr = retraining["lr"]
    stage = stages.get("retrain", {})
    return [("retraining", f"{retraining['method']}, lr {lr['lr']:g}{' (auto)' if lr['mode'] == 'auto' else ''}, "
                           f"{retraining['steps']} steps, {retraining['tokens_seen']:,} tokens "
                           f"({retraining['tokens_seen_with_probes']:,} with the lr probes)"),
            ("retrain time / peak RSS", f"{stage.get('seconds', 0):.1f} s / {stage.get('peak_rss_gb', 0):.2f} GB"
                                        + (f" / CUDA {stage['cuda_peak_gb']:.2f} GB" if stage.get("cuda_peak_gb")
                                           else ""))]


def method_label(cfg: dict) -> str:
    if cfg["method"] == "flap":
        width = cfg["width"]
        return (
            f"flap {width['ratio']:.0%} ({width['structure']}, bias compensation "
            f"{'on' if width['bias_compensation'] else 'off'})"
        )
    if cfg["method"] == "layers":
        depth = cfg["depth"]
        comp = "with" if depth["compensation"] else "without"
        shot = ", one shot" if depth["one_shot"] else ""
        return f"layers: remove {depth['remove']} by {depth['metric']} ({comp} compensation{shot})"
    return f"{cfg['method']} {pruning_target(cfg)}"


def _recon_label(rc: dict, recon: dict | None) -> str:
    if not recon:
        return "none"
    lr = recon["lr"]
    if lr["lr"] is None:
        return f"{rc['granularity']}: no submodel to train"
    chosen = f"lr {lr['lr']:g}" + (" (auto)" if lr["mode"] == "auto" else "")
    return f"{rc['granularity']}, {rc['propagation']} propagation, {rc['loss']}, {chosen}, {rc['epochs']} epoch(s)"


def _reconstruction_markdown(report: Report, plot: str | None) -> list[str]:
    recon, rc = report["reconstruction"], report["config"]["reconstruct"]
    targets = ("targets: the dense blocks each remaining block stands for (after structured pruning). "
               if report.get("structure") else "pruned weights held at exactly zero. ")
    lines = ["", "## Reconstruction", "",
             f"Granularity `{rc['granularity']}`, propagation `{rc['propagation']}`, loss `{rc['loss']}`, AdamW "
             f"(weight decay {rc['weight_decay']:g}), batch {rc['batch_size']} windows, {rc['epochs']} epoch(s), "
             f"linear warm-up over {rc['warmup']:.0%} of steps then linear decay to 0; norms "
             f"{'frozen' if rc['freeze_norms'] else 'trained'}; {targets}Losses are on the training windows and on "
             f"{report['data']['calibration']['heldout']} held-out calibration windows (never the evaluation text)."]
    lines += _learning_rate_markdown(recon["lr"])
    whole = [r["submodel"] for r in recon["submodels"] if len(r.get("halves", [])) == 2]
    if whole and rc["granularity"] == "attn-mlp":
        lines += ["", f"Trained whole ({', '.join(whole)}): attention and MLP side by side, both reading the block "
                      "input, leave no point of the residual stream between them to match."]
    untrained = [r["submodel"] for r in recon["submodels"] if r.get("kept_untrained")]
    untrained += [f"{r['submodel']}.{m['layer']}" for r in recon["submodels"] for m in r.get("matrices", [])
                  if m.get("kept_untrained")]
    if untrained:
        lines += ["", "Kept untrained (training raised their held-out loss at every lr tried): "
                      f"{', '.join(untrained)}."]
    if "seconds" in recon:
        seconds = ", ".join(f"{k} {v:.0f} s" for k, v in recon["seconds"].items())
        where = "in memory-mapped files" if recon["offload"] else "in memory"
        lines += ["", f"Time by phase: {seconds}. Cached activations {where}."]
    if recon.get("resumed_after"):
        lines += ["", f"Resumed from a checkpoint after {recon['resumed_after']} of {len(recon['submodels'])} "
                      "submodels (`--resume`); their records and times are the interrupted run's."]
    if "precision" in recon:
        lines += ["", "Matmuls in " + ("bfloat16 (autocast; weights, residual stream, targets and losses float32)."
                                      if recon["precision"] == "bfloat16" else "float32.")]
    if plot:
        lines += ["", f"![reconstruction loss per submodel]({plot})"]
    return lines + _submodel_table(recon["submodels"])


def _per_lr(values: dict[str, float | None], digits: int) -> str:
    """`lr: value, ...` of an lr probe; None is a probe that diverged."""
    return ", ".join(f"{k}: {'diverged' if v is None else f'{v:.{digits}f}'}" for k, v in values.items())


def _learning_rate_markdown(lr: dict) -> list[str]:
    if lr["mode"] != "auto" or lr["lr"] is None:
        return []
    scores = _per_lr(lr["heldout_loss_ratio_geomean"], 3)
    if lr.get("dropped_after"):
        scores += " (" + ", ".join(f"{k} dropped after submodel {n}" for k, n in lr["dropped_after"].items()) + ")"
    if lr.get("every_problem_probed"):
        return ["", f"Learning rate `auto`: only {lr['probed_problems']} submodels, each tried with every lr of the "
                    f"grid and kept at its best; held-out loss after/before (geometric mean) {scores}; best overall "
                    f"**{lr['lr']:g}**."]
    return ["", f"Learning rate `auto`: the grid was tried on the first {lr['probed_problems']} submodels; held-out "
                f"loss after/before (geometric mean) {scores}; chosen **{lr['lr']:g}**."]


def _submodel_table(records: list[dict]) -> list[str]:
    lines = ["", "| submodel | lr | trainable | train loss before → after | held-out loss before → after | seconds |",
             "|---|---|---|---|---|---|"]
    for r in records:
        lr = "kept untrained" if r.get("kept_untrained") else "per matrix" if r.get("lr") is None else f"{r['lr']:g}"
        trainable = r.get("trainable", sum(m["trainable"] for m in r.get("matrices", [])))
        lines.append(f"| {r['submodel']} | {lr} | {trainable} | {r['loss_train_before']:.4g} → "
                     f"{r['loss_train_after']:.4g} | {r['loss_heldout_before']:.4g} → {r['loss_heldout_after']:.4g} "
                     f"| {r['seconds']:.1f} |")
    return lines


def _parameters_line(structure: dict) -> str:
    saved = f" ({structure['parameters_saved']:,} in the saved files)" if "parameters_saved" in structure else ""
    return f"Parameters {structure['parameters_before']:,} → {structure['parameters_after']:,}{saved}."


def _depth_markdown(structure: dict) -> list[str]:
    rounds = "one shot" if structure["one_shot"] else "iterative (re-scored after each removal)"
    head = f" (LM head: {structure['head']})" if structure.get("head") else ""
    lines = ["", "## Layer removal", "",
             f"Metric `{structure['metric']}`, {rounds}, magnitude compensation "
             f"{'on' if structure['compensation'] else 'off'}{head}. Blocks are numbered as in the dense model; "
             "lower scores are removed first.", _parameters_line(structure),
             "", "| round | removed | compensation s | scores |", "|---|---|---|---|"]
    for number, step in enumerate(structure["steps"], 1):
        scale = step["scale"]
        scale = "–" if scale is None else ", ".join(f"{v:.4f}" for v in (scale if isinstance(scale, list) else [scale]))
        scores = ", ".join(f"{k}: {v:.4g}" for k, v in step["scores"].items())
        lines.append(f"| {number} | {', '.join(map(str, step['removed']))} | {scale} | {scores} |")
    return lines


def _width_markdown(structure: dict) -> list[str]:
    compensation = "on" if structure["bias_compensation"] else "off"
    return ["", "## Width removal (FLAP)", "",
            f"Structure `{structure['structure']}`, ratio {structure['ratio']:.0%} of the attention and MLP "
            f"parameters, bias compensation {compensation}. Attention is pruned by whole KV groups (a KV head with "
            "its query heads).", _parameters_line(structure), "", "| layer | units kept / total | unit |",
            "|---|---|---|", *(f"| {r['layer']} | {r['units'] - r['removed']} / {r['units']} | {r['unit']} |"
                               for r in structure["layers"])]


def _figure(path: Path, draw) -> bool:
    """One 8 × 3.5 in plot drawn by `draw(ax)`, with its legend, saved to `path`; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 3.5))
    draw(ax)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_reconstruction(report: dict, path: Path) -> bool:
    """Per-submodel held-out loss before and after reconstruction (log scale); False without matplotlib."""
    records, rc = report["reconstruction"]["submodels"], report["config"]["reconstruct"]

    def draw(ax) -> None:
        for key, label in (("loss_heldout_before", "pruned"), ("loss_heldout_after", "reconstructed")):
            ax.plot(range(len(records)), [r[key] for r in records], marker=".", label=label)
        ax.set_yscale("log")
        ax.set_xlabel("submodel (model order)")
        ax.set_ylabel(f"held-out {rc['loss']} loss")
        ax.set_title(f"{method_label(report['config'])} + {rc['granularity']} reconstruction")

    return _figure(path, draw)


def plot_retraining(report: dict, path: Path) -> bool:
    """Retraining loss per optimiser step (train) and at the held-out evaluations; False without matplotlib."""
    curve = report["retraining"]["curve"]

    def draw(ax) -> None:
        ax.plot([t for _, t, _ in curve["train"]], [v for _, _, v in curve["train"]], lw=0.8, label="train (per step)")
        ax.plot([t for _, t, _ in curve["heldout"]], [v for _, _, v in curve["heldout"]], marker="o", label="held-out")
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("next-token cross-entropy")
        ax.set_title(f"{method_label(report['config'])}: {report['retraining']['method']} retraining")

    return _figure(path, draw)


def _retraining_markdown(report: Report, plot: str | None) -> list[str]:
    r, rt = report["retraining"], report["config"]["retrain"]
    lora = (f" LoRA rank {r['rank']}, alpha {r['alpha']:g}, update multiplied by the pruning mask, merged into the "
            "weights; biases and norms trained." if r["method"] == "masklora" else " Every remaining weight trained.")
    lr = r["lr"]
    chosen = (f"lr `auto`: each of {', '.join(f'{v:g}' for v in lr['grid'])} trained {lr['probe_steps']} steps; "
              f"held-out loss {_per_lr(lr['heldout_loss'], 4)}; chosen "
              f"**{lr['lr']:g}**." if lr["mode"] == "auto" else f"lr {lr['lr']:g} (fixed).")
    if lr.get("at_edge"):
        chosen += (" The best rate is the last one the search may try, at its edge: a `--retrain-lr-grid` "
                   "beyond it may do better.")
    lines = ["", "## Retraining", "",
             f"`{r['method']}`: next-token cross-entropy on {r['windows']} calibration-source windows "
             f"({r['tokens_seen']:,} tokens seen in {r['steps']} steps of {r['batch_size']} × {r['accumulate']} "
             f"windows), AdamW (weight decay {rt['weight_decay']:g}), linear warm-up {rt['warmup']:.0%} then linear "
             f"decay, {r['precision']}{', gradient checkpointing' if r['checkpointing'] else ''}.{lora} {chosen} "
             f"Held-out loss ({r['heldout_windows']} windows) {r['heldout_loss_before']:.4f} → "
             f"{r['heldout_loss_after']:.4f}; pruned weights still zero: {r.get('mask_kept', False)}."]
    return lines + (["", f"![retraining loss]({plot})"] if plot else [])


def _zeroshot_markdown(metrics: dict) -> list[str]:
    runs = [(k, label) for k, label in (("zeroshot_dense", "dense"), ("zeroshot", "after")) if k in metrics]
    if not runs:
        return []
    last = metrics[runs[-1][0]]
    lines = ["", "## Zero-shot accuracy", "",
             f"{last['harness']} {last['harness_version']}, {last['fewshot']}-shot log-likelihood multiple choice, "
             f"at most {last['limit'] or 'all'} examples per task; acc_norm – where the task defines none.", "",
             "| task | data | version | examples | chance | "
             + " | ".join(f"acc {lb} | acc_norm {lb}" for _, lb in runs) + " |",
             "|---|---|---|---|---|" + "---|---|" * len(runs)]
    for task, entry in last["tasks"].items():
        cells = " | ".join(f"{accuracy(metrics[k]['tasks'][task]['acc'])} | "
                           f"{accuracy(metrics[k]['tasks'][task]['acc_norm'])}" for k, _ in runs)
        guess = f"{entry['chance']:.3f}" if entry.get("chance") is not None else "–"
        lines.append(f"| {task} | {entry.get('source', '')} | {entry['version']} | {entry['examples']} | {guess} "
                     f"| {cells} |")
    mean_cells = " | ".join(" | ".join(mean_accuracies(metrics[k])) for k, _ in runs)
    return lines + [f"| mean | | | | | {mean_cells} |"]


def _data_markdown(data: dict) -> list[str]:
    lines = []
    ev, cal = data.get("evaluation"), data.get("calibration")
    if ev:
        bos = "a BOS token before each window (every text token predicted)" if ev.get("bos") else "no BOS"
        lines += ["", "## Evaluation protocol", "",
                  f"{ev['windows']} non-overlapping windows of {ev['seqlen']} tokens ({ev['tokens']} tokens) from "
                  f"`{ev['source']}` ({ev['description']}, documents joined by a blank line), {bos}, perplexity = "
                  "exp(mean NLL of every predicted token)."]
    if cal:
        lines += ["", "## Calibration", "",
                  f"{cal['samples']} windows × {cal['seqlen']} tokens drawn with seed {cal['seed']} from "
                  f"`{cal['source']}` ({cal['description']}, {cal['text_tokens']} tokens); window starts are in "
                  "prunelab.json."]
    return lines


def _permuted_label(layers: list[dict]) -> str:
    permuted = [r["permuted"] for r in layers if "permuted" in r]
    if not permuted:
        return "none (no layer's input channels could be reordered)"
    before, after = (sum(p[key] for p in permuted) / len(permuted) for key in ("kept_before", "kept_after"))
    return f"{len(permuted)} layers; the pattern keeps {before:.2%} → {after:.2%} of their scores (mean)"


def _stages_markdown(stages: dict[str, StageRecord]) -> list[str]:
    cuda = any("cuda_peak_gb" in s for s in stages.values())
    lines = ["", "## Stages", "", "| stage | seconds | peak RSS (GB) |" + (" peak CUDA (GB) |" if cuda else ""),
             "|---|---|---|" + ("---|" if cuda else "")]
    for name, s in stages.items():
        cuda_cell = f" {s.get('cuda_peak_gb', 0):.2f} |" if cuda else ""
        lines.append(f"| {name} | {s['seconds']:.1f} | {s['peak_rss_gb']:.2f} |{cuda_cell}")
    return lines


def _sparsity_markdown(report: Report) -> list[str]:
    lines = ["", "## Sparsity per layer (measured on the saved tensors)", "",
             "| tensor | shape | sparsity | zeros before pruning |", "|---|---|---|---|"]
    for name, entry in report["sparsity"]["layers"].items():
        shape = "×".join(map(str, entry["shape"]))
        lines.append(f"| {name} | {shape} | {entry['sparsity']:.2%} | {entry.get('zeros_before', 0)} |")
    retries = [r for r in report["layers"] if r.get("damp_retries")]
    fallbacks = [r for r in report["layers"] if r.get("fallback")]
    if retries or fallbacks:
        lines += ["", "## Notes", ""]
        lines += [f"- block {r['block']} {r['layer']}: Cholesky needed damping {r['damp']:g} "
                  f"({r['damp_retries']} retries)" for r in retries]
        lines += [f"- block {r['block']} {r['layer']}: {r['fallback']}" for r in fallbacks]
    return lines


def _layerwise_markdown(report: Report) -> list[str]:
    """OWL's plan per block beside what the saved tensors hold (a block's tensors: the first index in their names)."""
    planned = {r["block"]: r for r in report["layers"] if "target" in r}
    measured: dict[int, list[float]] = {}
    for name, entry in report["sparsity"]["layers"].items():
        block = int(re.search(r"\.(\d+)\.", name).group(1))
        numel = math.prod(entry["shape"])
        zeros, total = measured.get(block, [0.0, 0])
        measured[block] = [zeros + entry["sparsity"] * numel, total + numel]
    lines = ["", "## Sparsity per block (layerwise owl)", "",
             "| block | outlier share | planned | measured |", "|---|---|---|---|"]
    for block, r in sorted(planned.items()):
        zeros, total = measured.get(block, [0.0, 0])
        saved = f"{zeros / total:.2%}" if total else "–"
        lines.append(f"| {block} | {r['outlier_share']:.3%} | {r['target']:.2%} | {saved} |")
    return lines


def to_markdown(report: Report, plot: str | None = None, retrain_plot: str | None = None) -> str:
    lines = ["# prunelab run", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary_rows(report)]
    lines += _data_markdown(report["data"])
    if report.get("reconstruction"):
        lines += _reconstruction_markdown(report, plot)
    if report.get("retraining"):
        lines += _retraining_markdown(report, retrain_plot)
    lines += _zeroshot_markdown(report["metrics"])
    lines += _stages_markdown(report["stages"])
    if report.get("structure"):
        structure = report["structure"]
        lines += _depth_markdown(structure) if "blocks_before" in structure else _width_markdown(structure)
    if report["sparsity"] is not None:
        if any("target" in r for r in report["layers"]):
            lines += _layerwise_markdown(report)
        lines += _sparsity_markdown(report)
    lines += ["", "## Versions", "", "```", json.dumps(report["versions"], indent=1), "```", ""]
    return "\n".join(lines)


def write(report: Report, folder: Path) -> None:
    plot = None
    if report.get("reconstruction") and plot_reconstruction(report, folder / "reconstruction_loss.png"):
        plot = "reconstruction_loss.png"
    retrain_plot = None
    if report.get("retraining") and plot_retraining(report, folder / "retraining_loss.png"):
        retrain_plot = "retraining_loss.png"
    (folder / "prunelab.json").write_text(json.dumps(report, indent=1))
    (folder / "REPORT.md").write_text(to_markdown(report, plot, retrain_plot))
