"""Resume after a crash. The sequential passes (pruning alone; pruning with reconstruction) checkpoint
their progress in a hidden sibling of the output folder; after `kill -9` or a power cut the same command
with `--resume` loads the newest checkpoint and goes on from the step after it. Every later step then
sees the same weights, activations, seeds and RNG state as in the uninterrupted run, so the result is
the same (bitwise on CPU in one process).

    .<out>.resume/
        .prunelab                 pid of the process writing it (a live one is never disturbed)
        shards/                   a streamed run's output shards, one per finished block (streaming.py)
        run.json                  what must match to resume: the config and the calibration text's hash
        weights-00012.safetensors the blocks the steps since the previous checkpoint changed
        state-00012.safetensors   the activations the next step reads, the RNG state
        state-00012.json          the pass's records so far; written last, so it marks a whole checkpoint

A checkpoint is written after a step when `every_seconds` have passed since the previous one (saving
hundreds of MB of activations after each of SmolLM2's 60 half-blocks would add a fifth to the run) and
after the last step, without activations: a crash in retraining or evaluation resumes after the pass.
The folder is made at the first checkpoint and goes once the run's output is saved.

Under torchrun each process holds its own share of the activations: process r > 0 writes its own
`state-00012.rank<r>.safetensors` and `.json` beside process 0's, the processes wait for each other, and
only then does process 0 write its `state-00012.json`, which completes the checkpoint for all of them.
Process 0 alone checks the folder, writes the weights (the same in every process) and removes the folder;
the number of processes is part of what must match. Over several nodes the output's folder must be on
storage they share.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import distributed
from .errors import PrunelabError
from .files import MARKER, pid_alive

# config keys that may differ between the interrupted run and its resumption
FREE_KEYS = ("out", "overwrite", "resume", "threads", "device")


def checkpoint_folder(out: Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.resume"


def _flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class Checkpoints:
    """The checkpoints of one run's sequential pass (see the module docstring)."""

    every_seconds = 60.0

    def __init__(self, out: Path, fingerprint: dict):
        self.folder = checkpoint_folder(out)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it will read back
        self.last_saved = time.monotonic()
        self.dirty: set[int] = set()  # blocks changed since the last checkpoint

    # --- before any work -------------------------------------------------------------------------
    def open(self, resume: bool, overwrite: bool) -> None:
        """Check what is there against what was asked; claim the folder for this run (process 0 decides)."""
        problem = None
        if distributed.is_main():
            try:
                self._open(resume, overwrite)
            except PrunelabError as exc:
                problem = str(exc)
        problem = distributed.from_main(problem)
        if problem is not None:
            raise PrunelabError(problem)

    def _open(self, resume: bool, overwrite: bool) -> None:
        folder = self.folder
        if folder.exists():
            owner = _owner(folder)
            if owner is not None and owner != os.getpid() and pid_alive(owner):
                raise PrunelabError(f"another prunelab process (pid {owner}) is running this job: {folder} is its "
                                    "checkpoint folder")
            if not resume and not overwrite and self.latest_step() is not None:
                raise PrunelabError(f"an interrupted run of this output left checkpoints in {folder}: pass --resume "
                                    "to continue it, or --overwrite to start over")
        if resume:
            if self.latest_step() is None:
                raise PrunelabError(f"--resume: nothing to resume, no checkpoint in {folder}")
            self._check_same_run()
            self.claim()
        elif folder.exists():
            if _owner(folder) is None:
                raise PrunelabError(f"{folder} is in the way of this run's checkpoints and is not prunelab's "
                                    f"(no {MARKER} in it); move it away or choose another --out")
            shutil.rmtree(folder)

    def claim(self) -> None:
        """Mark the folder as this process's (created at the first checkpoint: a run that fails before
        one leaves nothing behind; a streamed run claims it at once, its output shards are written there)."""
        if not distributed.is_main():
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / MARKER).write_text(str(os.getpid()))
            (self.folder / "run.json").write_text(json.dumps(self.fingerprint, indent=1))
        except OSError as exc:
            raise PrunelabError(f"cannot write the checkpoint folder {self.folder}: {exc.strerror or exc}") from None

    def _check_same_run(self) -> None:
        try:
            before = json.loads((self.folder / "run.json").read_text())
        except (OSError, ValueError):
            raise PrunelabError(f"--resume: {self.folder / 'run.json'} is missing or unreadable; cannot tell "
                                "whether it is this run's (pass --overwrite to start over)") from None
        old, new = _flatten(before), _flatten(self.fingerprint)
        changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if changed:
            key = changed[0]
            more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
            raise PrunelabError(f"--resume: {key} was {old.get(key)!r} in the interrupted run, now {new.get(key)!r}"
                                f"{more}; run the same command, or pass --overwrite instead to start over")

    # --- during the pass --------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        """The newest complete checkpoint: the newest `state-*.json` of process 0."""
        if not self.folder.is_dir():
            return None
        steps = [int(p.name[len("state-"):].split(".")[0]) for p in self.folder.glob("state-*.json") if _rank(p) == 0]
        return max(steps) if steps else None

    def changed(self, *blocks: int) -> None:
        self.dirty.update(blocks)

    def due(self, step: int, steps: int) -> bool:
        """Whether to checkpoint after `step`; process 0's clock decides for all processes."""
        return distributed.from_main(step == steps or time.monotonic() - self.last_saved >= self.every_seconds)

    def save(self, step: int, blocks: list[torch.nn.Module], tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Checkpoint after `step` steps: the changed blocks' weights, `tensors` (this process's activations
        the next step reads) and its RNG state, then `meta` (records; JSON); process 0's meta completes it."""
        main, name, mine = distributed.is_main(), f"{step:05d}", _own_suffix()
        if main and not (self.folder / MARKER).is_file():
            self.claim()
        distributed.barrier()  # the folder exists before the other processes write into it
        # a streamed block that has left memory (its weights on the meta device) is in the output's shards
        weights = {f"{i}.{key}": value.detach().contiguous().cpu()
                   for i in sorted(self.dirty) for key, value in blocks[i].state_dict().items()
                   if not value.is_meta} if main else {}
        if weights:
            save_file(weights, self.folder / f"weights-{name}.safetensors")
        tensors = {key: value.contiguous().cpu() for key, value in tensors.items()}
        save_file({**tensors, "rng_state": torch.get_rng_state()}, self.folder / f"state-{name}{mine}.safetensors")
        if not main:
            (self.folder / f"state-{name}{mine}.json").write_text(json.dumps(meta))
        distributed.barrier()  # every process's part is on disk before process 0 completes the checkpoint
        if main:
            partial = self.folder / f"state-{name}.json.tmp"
            partial.write_text(json.dumps(meta))
            os.replace(partial, self.folder / f"state-{name}.json")
        distributed.barrier()
        for old in self.folder.glob("state-*"):  # only the newest activations are ever read
            if _rank(old) == distributed.rank() and not old.name.startswith(f"state-{name}{mine}."):
                old.unlink()
        self.dirty.clear()
        self.last_saved = time.monotonic()

    def load(self, blocks: list[torch.nn.Module]) -> tuple[int, dict[str, torch.Tensor], dict]:
        """Put the newest checkpoint's weights into `blocks` and this process's RNG state into torch; returns
        (steps done, this process's activations saved with it, its meta)."""
        step = self.latest_step()
        name, mine = f"{step:05d}", _own_suffix()
        for file in sorted(self.folder.glob("weights-*.safetensors")):
            if int(file.stem.split("-")[1]) > step:
                continue  # written by a checkpoint that did not complete
            by_block: dict[int, dict[str, torch.Tensor]] = {}
            for key, value in load_file(file).items():
                index, rest = key.split(".", 1)
                by_block.setdefault(int(index), {})[rest] = value
            for index, state in by_block.items():
                blocks[index].load_state_dict(state, strict=True)
        tensors = load_file(self.folder / f"state-{name}{mine}.safetensors")
        torch.set_rng_state(tensors.pop("rng_state"))
        meta = json.loads((self.folder / f"state-{name}{mine}.json").read_text())
        self.last_saved = time.monotonic()
        return step, tensors, meta

    # --- after the run ----------------------------------------------------------------------------
    def finish(self) -> None:
        if distributed.is_main():
            shutil.rmtree(self.folder, ignore_errors=True)


def _own_suffix() -> str:
    return f".rank{distributed.rank()}" if distributed.rank() else ""


def _rank(path: Path) -> int:
    """The process whose file `path` is (`state-00012.rank1.json` → 1; process 0's files carry no rank)."""
    part = path.name.split(".")[1]
    return int(part[len("rank"):]) if part.startswith("rank") else 0


def _owner(folder: Path) -> int | None:
    try:
        return int((folder / MARKER).read_text().strip())
    except (OSError, ValueError):
        return None
