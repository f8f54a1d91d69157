"""Data parallel over calibration windows: 2 gloo processes (torchrun) against 1 process."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import prunelab
from prunelab.distributed import share
from prunelab.errors import PrunelabError


def torchrun(args: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               "-m", "prunelab", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def run_args(model_dir, texts, out, *extra):
    calib, evaluation = texts
    return ["run", "--model", str(model_dir), "--calib", str(calib), "--eval", str(evaluation), "--samples", "8",
            "--seqlen", "32", "--eval-seqlen", "32", "--eval-windows", "6", "--forward-batch", "2",
            "--reconstruct", "none", "--out", str(out), *extra]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_two_processes_prune_like_one(tiny_dir, texts, tmp_path, method):
    one = tmp_path / "one"
    calib, evaluation = texts
    single = prunelab.run(dict(model=str(tiny_dir), calib=str(calib), eval=str(evaluation), samples=8, seqlen=32,
                               eval_seqlen=32, eval_windows=6, forward_batch=2, reconstruct="none", method=method,
                               out=str(one)), progress=False)
    two = tmp_path / "two"
    done = torchrun(run_args(tiny_dir, texts, two, "--method", method))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((two / "prunelab.json").read_text())
    assert report["data"]["processes"]["world_size"] == 2
    assert report["data"]["processes"]["windows"]["calibration"] == [0, 4]
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    for name in single["sparsity"]["layers"]:
        assert torch.equal(a[name] == 0, b[name] == 0), name  # the same masks
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)
    for key in ("dense", "pruned"):
        assert report["metrics"][key]["perplexity"] == pytest.approx(single["metrics"][key]["perplexity"], rel=1e-5)
        assert report["metrics"][key]["predicted_tokens"] == single["metrics"][key]["predicted_tokens"]


def test_data_parallel_refusals(tiny_dir, texts, tmp_path):
    done = torchrun(run_args(tiny_dir, texts, tmp_path / "out", "--reconstruct", "attn-mlp"))
    assert done.returncode != 0 and "does not support reconstruction" in done.stderr
    assert not (tmp_path / "out").exists()


def test_share_of_windows():
    assert share(7, "calibration") == slice(0, 7)  # one process: all of them
    with pytest.raises(PrunelabError, match="2 processes but only 1 calibration"):
        from unittest import mock
        with mock.patch("prunelab.distributed.size", return_value=2):
            share(1, "calibration")
