"""A grid of runs, one table and plots: `prunelab study grid.yaml`.

The grid file:

    base:                       # RunConfig values every run shares
      threads: 2
    grid:                       # every combination of these; dotted keys reach nested options
      method: [magnitude, wanda, sparsegpt]
      pattern: [null, "2:4"]
      reconstruct.granularity: [none, matrix, attn-mlp]
    runs:                       # further single runs (optional), each a set of overrides of `base`
      - {method: wanda, reconstruct.propagation: dense}

Each run is a separate process (so that its peak memory is its own) and writes its report to
`<out>/runs/<name>.json` as soon as it ends; the table is rewritten before every run and at the
end, and an interrupted study resumes where it stopped. `--table-only` tables the finished runs and runs nothing.
A grid over criteria and granularities also gets the seed paper's layout: pattern and criterion ×
granularity, with a column for every granularity the grid plans ("–" until its run has finished), and
the same cells' time in dense forward passes (stage seconds over the run's own targets phase), which
compares runs made on machines of different speed; docs/RESULTS.md copies both tables.
The dense model is evaluated once. Models are not saved.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

from .config import RunConfig, load_config_file, pruning_target
from .errors import PrunelabError
from .job import run_job
from .measure import python_argv
from .report import zeroshot_means


def _nest(flat: dict) -> dict:
    nested: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def plan(grid_file: Path) -> list[tuple[str, dict]]:
    spec = load_config_file(grid_file)
    unknown = set(spec) - {"base", "grid", "runs"}
    if unknown:
        raise PrunelabError(f"unknown study key(s) {sorted(unknown)} in {grid_file}; expected base, grid, runs")
    base = spec.get("base") or {}
    grid = spec.get("grid") or {}
    if not isinstance(base, dict) or not isinstance(grid, dict):
        raise PrunelabError(f"{grid_file}: base and grid must be mappings of option names to values")
    scalars = [key for key, values in grid.items() if not isinstance(values, list) or not values]
    if scalars:
        raise PrunelabError(f"{grid_file}: grid values must be non-empty lists of values to try; "
                            f"{', '.join(scalars)} is not (a single value belongs in base)")
    if not isinstance(spec.get("runs") or [], list) or not all(isinstance(r, dict) for r in spec.get("runs") or []):
        raise PrunelabError(f"{grid_file}: runs must be a list of mappings of option overrides")
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else []
    runs = []
    for overrides in combos + list(spec.get("runs") or []):
        values = _merge(_nest({k: v for k, v in base.items()}), _nest(overrides))
        values.pop("out", None)
        name = "_".join(f"{k.split('.')[-1]}-{'+'.join(map(str, v)) if isinstance(v, list) else v}"
                        for k, v in overrides.items()).replace(":", "of").replace("/", "-")
        name = re.sub(r"[^\w.+-]", "", name) or "base"  # skip's globs: no '*' in a file name
        try:
            RunConfig.from_dict(values)  # refuse a bad grid before hours of work
        except PrunelabError as exc:
            raise PrunelabError(f"{grid_file}, run {name}: {exc}") from None
        if name in (names := [n for n, _ in runs]):
            raise PrunelabError(f"{grid_file}: runs {names.index(name) + 1} and {len(runs) + 1} have the same "
                                f"overrides ({name})")
        runs.append((name, values))
    if not runs:
        raise PrunelabError(f"{grid_file} holds no runs: give a grid (option: [values to try]) or runs (a list of "
                            "overrides of base)")
    return runs


def open_study_folder(out: Path) -> None:
    """`out` is new, or a study's folder (a study resumes there): never a folder of other files the table and
    plots would land among."""
    if out.exists() and not out.is_dir():
        raise PrunelabError(f"study folder {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "runs").is_dir():
        raise PrunelabError(f"{out} holds files and is not a study's folder (it has no runs/): choose a new --out")
    try:
        (out / "runs").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PrunelabError(f"cannot write the study folder {out}: {exc.strerror or exc}") from None


def run_study(grid_file: Path, out: Path, progress: bool = True, run_missing: bool = True) -> list[dict]:
    """Run the grid's unfinished runs in order (or, with `run_missing=False`, none: table the
    finished ones, e.g. while another process is still running the study)."""
    runs = plan(grid_file)
    if not run_missing and not any((out / "runs" / f"{name}.json").exists() for name, _ in runs):
        raise PrunelabError(f"no finished run of {grid_file} in {out / 'runs'} to table")
    open_study_folder(out)
    granularities = list(dict.fromkeys(RunConfig.from_dict(values).reconstruct.granularity for _, values in runs))
    results = []
    for number, (name, values) in enumerate(runs):
        path = out / "runs" / f"{name}.json"
        finished = path.exists()
        if not finished and not run_missing:
            continue
        if not finished:
            if results:
                # a study stopped in the run below (hours long) still has its table so far
                write_table(results, out, granularities)
            values = dict(values, eval_dense=number == 0 and values.get("eval_dense", True))
            if progress:
                print(f"[{number + 1}/{len(runs)}] {name}", file=sys.stderr, flush=True)
            worker = python_argv("from prunelab.study import _worker; _worker(*sys.argv[1:])")
            # the run's own bars (pruning, reconstruction, retraining, zero-shot): a run can take an hour
            done = subprocess.run([*worker, json.dumps(values), str(path), str(int(progress))])
            if done.returncode != 0:
                kept = (
                    f"finished runs are kept in {out / 'runs'} and tabled in {out / 'STUDY.md'}"
                    if results
                    else "no run of this study has finished yet"
                )
                raise PrunelabError(f"study run {name} failed (exit {done.returncode}); {kept}")
        run = json.loads(path.read_text())
        results.append(
            {"name": name, **run, **summarise(run["report"])}
        )  # runs saved before a summary field existed get it
    if results:
        write_table(results, out, granularities)
    return results


def summarise(report: dict) -> dict:
    cfg, rc = report["config"], report["config"]["reconstruct"]
    stage = report["stages"].get("prune+reconstruct") or report["stages"].get("prune") or {}
    recon = report.get("reconstruction")
    return {
        "method": cfg["method"],
        "pattern": pruning_target(cfg),
        "granularity": rc["granularity"],
        "propagation": rc["propagation"] if recon else "–",
        "loss": rc["loss"] if recon else "–",
        "lr": recon["lr"]["lr"] if recon else None,
        "perplexity": report["metrics"].get("pruned", {}).get("perplexity"),  # None with eval: none
        "dense_perplexity": report["metrics"].get("dense", {}).get("perplexity"),
        "seconds": stage.get("seconds"),
        "peak_rss_gb": stage.get("peak_rss_gb"),
        "cuda_peak_gb": stage.get("cuda_peak_gb"),
        # one dense forward pass over the calibration windows: the same work at every granularity,
        # so stage seconds / this compare runs made on machines (or sessions) of different speed
        "forward_pass_seconds": (recon.get("seconds") or {}).get("targets")
        if recon
        else None,  # depth runs' reconstruction has no phases
        "sparsity": report["sparsity"]["sparsity"] if report["sparsity"] else None,
        **recovery_summary(report),
    }


def recovery_summary(report: dict) -> dict:
    """Retraining and zero-shot columns: what recovered the model, on how many tokens, at what cost."""
    cfg, retraining = report["config"], report.get("retraining")
    windows = cfg["samples"] * cfg["seqlen"] if report.get("reconstruction") else 0
    retrained = retraining["tokens_seen"] if retraining else 0
    retrain_stage = report["stages"].get("retrain", {})
    zeroshot = report["metrics"].get("zeroshot") or {}
    return {"retrain": retraining["method"] if retraining else "none",
            "recovery_tokens": windows * cfg["reconstruct"]["epochs"] + retrained,
            # the text behind them: retraining's windows begin with the reconstruction's (job.retraining_data)
            "recovery_data_tokens": max(windows, retrained), "epochs": cfg["reconstruct"]["epochs"] if windows else 0,
            "retrain_seconds": retrain_stage.get("seconds"), "retrain_peak_rss_gb": retrain_stage.get("peak_rss_gb"),
            "zeroshot_acc": zeroshot.get("mean_acc"), "zeroshot_means": zeroshot_means(zeroshot),
            # per task as well: a study keeps the summary only, and the means hide what moved
            "zeroshot_tasks": {task: {k: entry[k] for k in ("acc", "acc_norm", "examples")}
                               for task, entry in zeroshot.get("tasks", {}).items()}}


def write_table(results: list[dict], out: Path, granularities: list[str] | None = None) -> None:
    dense = next((r["dense_perplexity"] for r in results if r.get("dense_perplexity")), None)
    lines = ["# prunelab study", ""]
    if dense:
        lines += [f"Dense perplexity: {dense:.2f}", ""]
    lines += [
        "| method | pattern | reconstruction | propagation | loss | lr | perplexity | time (s) | peak RSS (GB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lr = f"{r['lr']:g}" if r["lr"] is not None else "–"
        lines.append(
            f"| {r['method']} | {r['pattern']} | {r['granularity']} | {r['propagation']} | {r['loss']} | {lr} "
            f"| {_ppl(r)} | {r['seconds']:.0f} | {r['peak_rss_gb']:.2f} |"
        )
    recovery = recovery_table(results)
    lines += recovery
    lines += pivot(results, granularities)
    (out / "STUDY.md").write_text("\n".join(lines) + "\n")
    # the summary rows; each run's full report stays in runs/<name>.json only
    (out / "study.json").write_text(
        json.dumps([{k: v for k, v in r.items() if k != "report"} for r in results], indent=1)
    )
    _plot(results, out / "study.png", dense)
    if recovery:
        _plot_recovery(results, out / "recovery.png", dense)


def recovery_table(results: list[dict]) -> list[str]:
    """Reconstruction against retraining (when the study retrains or scores zero-shot tasks)."""
    if not any(r.get("retrain", "none") != "none" or r.get("zeroshot_acc") is not None for r in results):
        return []
    lines = ["", "## Recovery: reconstruction and retraining", "",
             "| method | pattern | reconstruction | retraining | recovery tokens: text (trained on) | perplexity "
             "| zero-shot acc / acc_norm | prune(+reconstruct) s, GB | retrain s, GB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        zs = r.get("zeroshot_means", "–")
        rt = "–" if r.get("retrain_seconds") is None else f"{r['retrain_seconds']:.0f}, {r['retrain_peak_rss_gb']:.2f}"
        tokens, text = r.get("recovery_tokens", 0), r.get("recovery_data_tokens", r.get("recovery_tokens", 0))
        tokens = f"{text:,}" + (f" ({tokens:,})" if tokens != text else "")
        lines.append(f"| {r['method']} | {r['pattern']} | {r['granularity']} | {r.get('retrain', 'none')} | "
                     f"{tokens} | {_ppl(r)} | {zs} | {r['seconds']:.0f}, "
                     f"{r['peak_rss_gb']:.2f} | {rt} |")
    return lines


def _ppl(row: dict) -> str:
    return "–" if row["perplexity"] is None else f"{row['perplexity']:.2f}"


def pivot(results: list[dict], granularities: list[str] | None = None) -> list[str]:
    """Pattern and criterion × reconstruction granularity (the seed paper's layout), when the grid
    spans two granularities or more; a cell is "perplexity (seconds, peak GB)", "–" not run yet.
    `granularities` are the grid's planned columns, in order; the finished runs' own are added."""
    rows = plotted_rows(results)
    granularities = list(dict.fromkeys([*(granularities or []), *(r["granularity"] for r in rows)]))
    if len(granularities) < 2:
        return []
    cells = {(r["pattern"], r["method"], r["granularity"]): r for r in rows}
    keys = list(dict.fromkeys((p, m) for p, m, _ in cells))

    def table(columns: list[str], cell: Callable[[dict], str]) -> list[str]:
        lines = [
            "| pattern | criterion | " + " | ".join("prune only" if g == "none" else g for g in columns) + " |",
            "|---|---|" + "---|" * len(columns),
        ]
        for pattern, method in keys:
            row = [cells.get((pattern, method, g)) for g in columns]
            lines.append(f"| {pattern} | {method} | " + " | ".join(cell(r) if r else "–" for r in row) + " |")
        return lines

    lines = [
        "",
        "## Criterion × granularity: perplexity (time s, peak RSS GB)",
        "",
        *table(granularities, lambda r: f"{_ppl(r)} ({r['seconds']:.0f} s, {r['peak_rss_gb']:.2f} GB)"),
    ]
    trained = [
        g for g in granularities if any((cells.get((p, m, g)) or {}).get("forward_pass_seconds") for p, m in keys)
    ]
    if trained:
        lines += [
            "",
            "Time of the prune+reconstruct stage in dense forward passes (its seconds over the run's own "
            "targets phase, one dense pass over the calibration windows): comparable across machines and sessions, "
            "which the seconds above are not.",
            "",
            *table(
                trained,
                lambda r: f"{r['seconds'] / r['forward_pass_seconds']:.1f}" if r.get("forward_pass_seconds") else "–",
            ),
        ]
    return lines


def plotted_rows(results: list[dict]) -> list[dict]:
    """The rows the plot draws as one line per criterion across granularities: prune-only rows and
    the reconstructions at the grid's own propagation, loss and calibration tokens (the most common
    triple; extra single runs vary them). Retrained runs have their own table (`recovery_table`): in a
    cell of this one they would stand for pruning alone."""
    pruned = [r for r in results if r.get("retrain", "none") == "none"]
    setups = [(r["propagation"], r["loss"], r.get("recovery_tokens")) for r in pruned if r["propagation"] != "–"]
    common = max(dict.fromkeys(setups), key=setups.count) if setups else None  # a tie goes to the first
    return [r for r in pruned if r["propagation"] == "–" or (r["propagation"], r["loss"], r.get("recovery_tokens"))
            == common]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def recovery_series(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Perplexity against the tokens of text a recovery used, one series per way of recovering (the
    reconstruction granularity, its epochs over that text, the retraining), each sorted by tokens."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r["perplexity"] is None or not r.get("recovery_data_tokens"):
            continue
        parts = [r["granularity"]] if r["granularity"] != "none" else []
        parts += [f"{r['epochs']} epochs"] if r.get("epochs", 1) > 1 else []
        parts += [r["retrain"]] if r.get("retrain", "none") != "none" else []
        series.setdefault(" + ".join(parts), []).append((r["recovery_data_tokens"], r["perplexity"]))
    return {label: sorted(points) for label, points in series.items()}


def _colours(plt, labels) -> dict[str, str]:
    """One colour per series across all panels (matplotlib's cycle restarts in each)."""
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {label: cycle[i % len(cycle)] for i, label in enumerate(dict.fromkeys(labels))}


def _plot_recovery(results: list[dict], path: Path, dense: float | None) -> None:
    """The data-efficiency curve: perplexity against tokens of text, one panel per pruning method and pattern;
    pruning alone and the dense model as horizontal lines."""
    plt = _pyplot()
    panels = list(dict.fromkeys((r["method"], r["pattern"]) for r in results if r["perplexity"] is not None))
    if plt is None or not panels:
        return
    from matplotlib import ticker
    colour = _colours(plt, recovery_series(results))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (method, pattern) in zip(axes[0], panels):
        rows = [r for r in results if r["pattern"] == pattern and r["method"] == method]
        for label, points in recovery_series(rows).items():
            ax.plot(*zip(*points), marker="o", label=label, color=colour[label])
        alone = [r["perplexity"] for r in rows if not r.get("recovery_data_tokens") and r["perplexity"]]
        for value, label, style in ((alone[0] if alone else None, "pruned only", ":"), (dense, "dense", "--")):
            if value:
                ax.axhline(value, color="grey", linestyle=style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x / 1024:g} k"))
        ax.yaxis.set_major_formatter(ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(ticker.ScalarFormatter())
        ax.set_xlabel("tokens of calibration text")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{method} {pattern}")
        # Below the axes: inside, the legend hides the lines it names.
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _plot(results: list[dict], path: Path, dense: float | None) -> None:
    plt = _pyplot()
    if plt is None:
        return
    results = [r for r in results if r["perplexity"] is not None]  # runs without evaluation have nothing to draw
    if not results:
        return
    patterns = list(dict.fromkeys(r["pattern"] for r in results))
    colour = _colours(plt, (r["method"] for r in results))
    fig, axes = plt.subplots(1, len(patterns), figsize=(5 * len(patterns), 3.8), squeeze=False)
    for ax, pattern in zip(axes[0], patterns):
        rows = [r for r in plotted_rows(results) if r["pattern"] == pattern]
        granularities = list(dict.fromkeys(r["granularity"] for r in rows))
        if len(granularities) < 2:
            # a grid over propagation and loss at one granularity: one bar per run
            every = [r for r in results if r["pattern"] == pattern]
            labels = [f"{r['method']} {r['granularity']}\n{r['propagation']} / {r['loss']}" for r in every]
            values = [r["perplexity"] for r in every]
            bars = ax.barh(labels, values)
            ax.bar_label(bars, fmt="%.2f", padding=2)
            if dense:
                ax.axvline(dense, color="grey", linestyle="--", label="dense")
            # the runs differ by a few percent: start the axis near the dense model, not at 0
            ax.set_xlim(0.9 * min(values + ([dense] if dense else [])), 1.08 * max(values))
            ax.set_xlabel("perplexity")
            ax.invert_yaxis()
        else:
            for method in dict.fromkeys(r["method"] for r in rows):
                points = {r["granularity"]: r["perplexity"] for r in rows if r["method"] == method}
                ax.plot(
                    [g for g in granularities if g in points],
                    [points[g] for g in granularities if g in points],
                    marker="o",
                    label=method,
                    color=colour[method],
                )
            if dense:
                ax.axhline(dense, color="grey", linestyle="--", label="dense")
            ax.set_yscale("log")
            ax.set_xlabel("reconstruction")
            ax.set_ylabel("perplexity")
        ax.set_title(f"{pattern}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _worker(values_json: str, result_path: str, progress: str = "0") -> None:
    report = run_job(RunConfig.from_dict(json.loads(values_json)), progress=progress == "1")
    report.pop("layers", None)
    if report["sparsity"]:
        report["sparsity"] = {k: v for k, v in report["sparsity"].items() if k != "layers"}
    summary = summarise(report)
    tmp = Path(result_path + ".tmp")
    tmp.write_text(json.dumps({**summary, "report": report}, indent=1))
    tmp.replace(result_path)
