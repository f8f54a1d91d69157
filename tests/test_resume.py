"""Resume after a crash: a run killed mid-pass and resumed ends with the same weights as one that was not."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from safetensors.torch import load_file
from tiny import tiny_model

import prunelab
from prunelab.errors import PrunelabError
from prunelab.recover.reconstruct import Reconstructor
from prunelab.resume import Checkpoints, checkpoint_folder


class Crash(BaseException):
    """Stands for kill -9 in-process: nothing of the job catches it, nothing cleans up."""


@pytest.fixture()
def four_blocks(tmp_path, tokenizer):
    folder = tmp_path / "tiny-4"
    tiny_model("llama", layers=4).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run(model_dir, texts, out, **overrides):
    calib, evaluation = texts
    values = dict(model=str(model_dir), calib=str(calib), eval=str(evaluation), samples=8, seqlen=32,
                  eval_seqlen=32, eval_windows=4, forward_batch=4, out=out and str(out), eval_dense=False,
                  reconstruct={"lr": 1e-3, "heldout": 4})
    values.update(overrides)
    return prunelab.run(values, progress=False)


def crash_after(monkeypatch, cls, method: str, calls: int):
    real, seen = getattr(cls, method), []

    def counted(self, *args, **kwargs):
        if len(seen) == calls:
            raise Crash
        seen.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, counted)


def weights(out):
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("lr, crash", [(1e-3, 5), ("auto", 2)])  # auto: in the middle of the lr probe
def test_reconstruction_resumed_after_a_crash_gives_the_same_weights(four_blocks, texts, tmp_path, monkeypatch, lr,
                                                                     crash):
    monkeypatch.setattr(Checkpoints, "every_seconds", 0.0)  # a checkpoint after every submodel
    extra = {"reconstruct": {"lr": lr, "heldout": 4, "lr_grid": [1e-4, 1e-3, 1e-2], "lr_probe": 3}}
    whole = run(four_blocks, texts, tmp_path / "whole", **extra)

    out = tmp_path / "crashed"
    with monkeypatch.context() as patch:
        crash_after(patch, Reconstructor, "_submodel", crash)
        with pytest.raises(Crash):
            run(four_blocks, texts, out, **extra)
    folder = checkpoint_folder(out)
    assert not out.exists() and Checkpoints(out, {}).latest_step() == crash

    with pytest.raises(PrunelabError, match="left checkpoints .* pass --resume"):
        run(four_blocks, texts, out, **extra)
    resumed = run(four_blocks, texts, out, resume=True, **extra)
    assert not folder.exists()
    assert resumed["reconstruction"]["resumed_after"] == crash
    assert f"after {crash} of 8 submodels" in (out / "REPORT.md").read_text()
    assert len(resumed["reconstruction"]["submodels"]) == 8
    assert resumed["reconstruction"]["lr"] == whole["reconstruction"]["lr"]
    expected, got = weights(tmp_path / "whole"), weights(out)
    assert expected.keys() == got.keys()
    assert all(expected[k].equal(got[k]) for k in expected)
    assert resumed["metrics"]["pruned"] == whole["metrics"]["pruned"]


@pytest.mark.parametrize("layerwise", ["uniform", "owl"])  # owl: planned again on the dense model, not the resumed
def test_pruning_resumed_after_a_crash_gives_the_same_weights(four_blocks, texts, tmp_path, monkeypatch, layerwise):
    from prunelab.prune import sequential

    monkeypatch.setattr(Checkpoints, "every_seconds", 0.0)
    kwargs = dict(method="sparsegpt", reconstruct="none", layerwise=layerwise)
    run(four_blocks, texts, tmp_path / "whole", **kwargs)
    out = tmp_path / "crashed"
    with monkeypatch.context() as patch:
        crash_after(patch, sequential.HalfPruner, "prune_half", 5)  # block 2's MLP half
        with pytest.raises(Crash):
            run(four_blocks, texts, out, **kwargs)
    assert Checkpoints(out, {}).latest_step() == 2
    resumed = run(four_blocks, texts, out, resume=True, **kwargs)
    expected, got = weights(tmp_path / "whole"), weights(out)
    assert all(expected[k].equal(got[k]) for k in expected)
    assert len(resumed["layers"]) == 4 * 7


def test_kill_9_then_resume(four_blocks, texts, tmp_path):
    """A real kill -9 of a separate process in the middle of reconstruction, then --resume."""
    out = tmp_path / "killed"
    calib, evaluation = texts
    args = ["run", "--model", str(four_blocks), "--calib", str(calib), "--eval", str(evaluation), "--samples", "8",
            "--seqlen", "32", "--eval-seqlen", "32", "--eval-windows", "4", "--lr", "1e-3", "--heldout", "4",
            "--no-eval-dense", "--out", str(out)]
    # checkpoints after every submodel; the process stops itself (SIGKILL) in the fourth
    script = textwrap.dedent(f"""
        import os, signal, sys
        from prunelab.cli import app
        from prunelab.recover.reconstruct import Reconstructor
        from prunelab.resume import Checkpoints
        Checkpoints.every_seconds = 0.0
        real, calls = Reconstructor._submodel, []
        def submodel(self, *a, **k):
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            calls.append(1)
            return real(self, *a, **k)
        Reconstructor._submodel = submodel
        sys.argv = ["prunelab", *{args!r}]
        app()
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    killed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert Checkpoints(out, {}).latest_step() == 3 and not out.exists()

    from typer.testing import CliRunner

    from prunelab.cli import app
    done = CliRunner().invoke(app, [*args, "--resume", "--json"])
    assert done.exit_code == 0, done.output
    whole = run(four_blocks, texts, tmp_path / "whole")
    expected, got = weights(tmp_path / "whole"), weights(out)
    assert all(expected[k].equal(got[k]) for k in expected)
    assert json.loads((out / "prunelab.json").read_text())["reconstruction"]["resumed_after"] == 3
    assert whole["reconstruction"].get("resumed_after") is None


def test_resume_refusals(four_blocks, texts, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with pytest.raises(PrunelabError, match="nothing to resume"):
        run(four_blocks, texts, out, resume=True)
    assert not out.exists() and not checkpoint_folder(out).exists()

    monkeypatch.setattr(Checkpoints, "every_seconds", 0.0)
    with monkeypatch.context() as patch:
        crash_after(patch, Reconstructor, "_submodel", 2)
        with pytest.raises(Crash):
            run(four_blocks, texts, out)
    with pytest.raises(PrunelabError, match=r"--resume: sparsity was 0\.5 in the interrupted run, now 0\.6"):
        run(four_blocks, texts, out, resume=True, sparsity=0.6)
    with pytest.raises(PrunelabError, match="resume .* this run has no out"):
        run(four_blocks, texts, None, resume=True)
    with pytest.raises(PrunelabError, match="layers is not one"):
        run(four_blocks, texts, out, resume=True, method="layers", depth={"remove": 1})
    assert Checkpoints(out, {}).latest_step() == 2  # none of that touched the checkpoints
    report = run(four_blocks, texts, out, overwrite=True)  # starts over
    assert "resumed_after" not in report["reconstruction"] and not checkpoint_folder(out).exists()


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(four_blocks, texts, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        crash_after(patch, Reconstructor, "_submodel", 1)
        with pytest.raises(Crash):
            run(four_blocks, texts, out)  # the first checkpoint is due after 60 s
    assert not checkpoint_folder(out).exists()


@pytest.mark.parametrize("reconstruct, crash_in, calls, latest, shards", [
    ("none", "prune_half", 5, 2, 2),  # in block 2's MLP half: blocks 0 and 1 are in their shards
    ("attn-mlp", "_submodel", 3, 2, 1),  # in block 1's MLP half: the checkpoint is the one before block 1 came in
])
def test_streamed_run_resumed_after_a_crash_gives_the_same_weights(four_blocks, texts, tmp_path, monkeypatch,
                                                                    reconstruct, crash_in, calls, latest, shards):
    from prunelab.prune import sequential

    monkeypatch.setattr(Checkpoints, "every_seconds", 0.0)
    kwargs = dict(method="sparsegpt", max_memory=3e-4, reconstruct=reconstruct if reconstruct == "none" else
                  {"granularity": reconstruct, "lr": 1e-3, "heldout": 4})
    whole = run(four_blocks, texts, tmp_path / "whole", **kwargs)
    assert whole["model"]["streamed"]
    out = tmp_path / "crashed"
    with monkeypatch.context() as patch:
        crash_after(patch, Reconstructor if crash_in == "_submodel" else sequential.HalfPruner, crash_in, calls)
        with pytest.raises(Crash):
            run(four_blocks, texts, out, **kwargs)
    folder = checkpoint_folder(out)
    assert not out.exists() and Checkpoints(out, {}).latest_step() == latest
    assert len(list((folder / "shards").glob("*.safetensors"))) == shards  # the finished blocks
    resumed = run(four_blocks, texts, out, resume=True, **kwargs)
    assert not folder.exists()

    def state(folder):
        return {k: v for file in sorted(folder.glob("*.safetensors")) for k, v in load_file(file).items()}

    expected, got = state(tmp_path / "whole"), state(out)
    assert expected.keys() == got.keys() and all(expected[k].equal(got[k]) for k in expected)
    assert resumed["sparsity"] == whole["sparsity"]  # zeros before pruning too: blocks 0-1 were not read again
    assert resumed["metrics"]["pruned"] == whole["metrics"]["pruned"]
