"""Data parallel over calibration windows: 2 gloo processes (torchrun) against 1 process."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_model
from typer.testing import CliRunner

import prunelab
from prunelab import distributed
from prunelab.cli import app
from prunelab.distributed import share
from prunelab.errors import PrunelabError
from prunelab.resume import checkpoint_folder

# NCCL, one GPU a process, where the machine has two; else gloo on the CPU (the one-process baselines too)
DEVICE = "cuda" if torch.cuda.device_count() >= 2 else "cpu"


def torchrun(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "prunelab", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def in_process(args: list[str]) -> None:
    """The one-process baseline: the same command line, run in this process (no launcher, no imports to redo)."""
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output[-3000:]


def run_args(model_dir, texts, out, *extra):
    calib, evaluation = texts
    return ["run", "--model", str(model_dir), "--calib", str(calib), "--eval", str(evaluation), "--samples", "8",
            "--seqlen", "32", "--eval-seqlen", "32", "--eval-windows", "6", "--forward-batch", "2",
            "--reconstruct", "none", "--device", DEVICE, "--out", str(out), *extra]


@pytest.mark.parametrize("method, layerwise, pattern", [("wanda", "uniform", None), ("sparsegpt", "uniform", None),
                                                       ("wanda", "owl", None), ("wanda", "uniform", "2:4")])
def test_two_processes_prune_like_one(tiny_dir, texts, tmp_path, method, layerwise, pattern):
    one = tmp_path / "one"
    calib, evaluation = texts
    nm = dict(pattern=pattern, permute=True) if pattern else {}  # N:M here with channel permutation
    single = prunelab.run(dict(model=str(tiny_dir), calib=str(calib), eval=str(evaluation), samples=8, seqlen=32,
                               device=DEVICE, eval_seqlen=32, eval_windows=6, forward_batch=2, reconstruct="none",
                               method=method, layerwise=layerwise, out=str(one), **nm), progress=False)
    two = tmp_path / "two"
    done = torchrun(run_args(tiny_dir, texts, two, "--method", method, "--layerwise", layerwise,
                             *(["--pattern", pattern, "--permute"] if pattern else [])))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((two / "prunelab.json").read_text())
    assert report["data"]["processes"]["world_size"] == 2
    assert report["data"]["processes"]["windows"]["calibration"] == [0, 4]
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    for name in single["sparsity"]["layers"]:
        assert torch.equal(a[name] == 0, b[name] == 0), name  # the same masks
        if method == "wanda":  # no weight changes: the kept weights are the dense ones
            assert torch.equal(a[name], b[name]), name
        else:  # SparseGPT's updates go through H⁻¹, which amplifies the Hessian's summation-order differences
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    for key in ("dense", "pruned"):
        assert report["metrics"][key]["perplexity"] == pytest.approx(single["metrics"][key]["perplexity"], rel=1e-5)
        assert report["metrics"][key]["predicted_tokens"] == single["metrics"][key]["predicted_tokens"]
    # owl: the outlier shares from every process's windows, so the same plan
    assert [r.get("target") for r in report["layers"]] == [r.get("target") for r in single["layers"]]


@pytest.mark.parametrize("lr, loss", [("1e-3", "cmse"), ("auto", "mse")])
def test_two_processes_reconstruct_like_one(tiny_dir, texts, tmp_path, lr, loss):
    """Each step's windows split between the processes, gradients summed: the same training as one process
    holding every window, to floating-point summation order (cmse: with the channel scale of every window)."""
    calib, evaluation = texts
    single = prunelab.run(dict(model=str(tiny_dir), calib=str(calib), eval=str(evaluation), samples=8, seqlen=32,
                               device=DEVICE, eval_seqlen=32, eval_windows=6, forward_batch=2, eval_dense=False,
                               reconstruct={"lr": lr, "heldout": 4, "batch_size": 2, "loss": loss},
                               out=str(tmp_path / "one")),
                          progress=False)
    two = tmp_path / "two"
    done = torchrun(run_args(tiny_dir, texts, two, "--reconstruct", "attn-mlp", "--lr", lr, "--heldout", "4",
                             "--batch-size", "2", "--loss", loss, "--no-eval-dense"))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((two / "prunelab.json").read_text())
    assert report["data"]["processes"]["windows"]["heldout"] == [0, 2]
    assert report["reconstruction"]["lr"]["lr"] == single["reconstruction"]["lr"]["lr"]
    for mine, theirs in zip(report["reconstruction"]["submodels"], single["reconstruction"]["submodels"]):
        # Adam turns the last bits of a small gradient into whole steps: losses agree to ~1e-3 here, not bit for bit
        assert mine["loss_heldout_after"] == pytest.approx(theirs["loss_heldout_after"], rel=2e-2)
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(two / "model.safetensors")
    differ = sum(int(((a[n] == 0) != (b[n] == 0)).sum()) for n in single["sparsity"]["layers"])
    # block 0's attention is pruned from the same statistics (the same mask); later halves' statistics come
    # from reconstructed weights that agree to ~1e-4, which may swap two nearly tied weights
    assert differ <= 1e-3 * single["sparsity"]["numel"]
    for name in single["sparsity"]["layers"]:
        if ".0.self_attn." in name:
            assert torch.equal(a[name] == 0, b[name] == 0), name
        assert (a[name] - b[name]).norm() < 5e-2 * a[name].norm(), name  # a flipped Adam step moves a weight 2 lr
    assert report["metrics"]["pruned"]["perplexity"] == pytest.approx(single["metrics"]["pruned"]["perplexity"],
                                                                      rel=5e-3)


def test_two_processes_stream_like_one(tiny_dir, texts, tmp_path):
    """A model larger than the memory budget, streamed in each process: process 0 writes the shards, the
    others read them back for the evaluation; the same masks and perplexity as one process."""
    calib, evaluation = texts
    budget = 3e-4  # GB: one block of the tiny model (0.15 MB in float32), less than the whole
    single = prunelab.run(dict(model=str(tiny_dir), calib=str(calib), eval=str(evaluation), samples=8, seqlen=32,
                               device=DEVICE, eval_seqlen=32, eval_windows=6, forward_batch=2, reconstruct="none",
                               max_memory=budget, out=str(tmp_path / "one")), progress=False)
    two = tmp_path / "two"
    done = torchrun(run_args(tiny_dir, texts, two, "--max-memory", str(budget)))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((two / "prunelab.json").read_text())
    assert single["model"]["streamed"] and report["model"]["streamed"]
    assert report["data"]["processes"]["windows"]["evaluation"] == [0, 3]
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())

    def state(folder):
        return {k: v for file in sorted(folder.glob("*.safetensors")) for k, v in load_file(file).items()}

    a, b = state(tmp_path / "one"), state(two)
    for name in single["sparsity"]["layers"]:
        assert torch.equal(a[name] == 0, b[name] == 0), name
    for key in ("dense", "pruned"):
        assert report["metrics"][key]["perplexity"] == pytest.approx(single["metrics"][key]["perplexity"], rel=1e-5)
        assert report["metrics"][key]["predicted_tokens"] == single["metrics"][key]["predicted_tokens"]
    assert report["sparsity"]["sparsity"] == single["sparsity"]["sparsity"]


@pytest.mark.parametrize("family, method, reconstruct", [
    ("mixtral", "wanda", "none"), ("qwen2_moe", "wanda", "none"), ("mixtral", "sparsegpt", "none"),
    ("mixtral", "wanda", "attn-mlp"), ("qwen3_moe", "wanda", "attn-mlp")])
def test_two_processes_prune_routed_experts_like_one(tokenizer, texts, tmp_path, family, method, reconstruct):
    """64 experts, 2 a token: some expert is reached by one process's windows and not the other's. The processes
    agree on every expert's group and sum its statistics (zero where they saw none of its tokens)."""
    folder = tmp_path / "tiny-moe"
    experts = "num_local_experts" if family == "mixtral" else "num_experts"  # Qwen2-MoE: a shared expert too
    tiny_model(family, **{experts: 64}, num_experts_per_tok=2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    extra = ["--method", method, "--reconstruct", reconstruct, "--lr", "1e-3", "--heldout", "4", "--batch-size", "2"]
    in_process(run_args(folder, texts, tmp_path / "one", *extra))
    done = torchrun(run_args(folder, texts, tmp_path / "two", *extra))
    assert done.returncode == 0, done.stderr[-3000:]
    single, report = (json.loads((tmp_path / out / "prunelab.json").read_text()) for out in ("one", "two"))
    assert report["data"]["processes"]["world_size"] == 2
    # the same records, in the linears' order, not the order in which routing first reached them; after
    # reconstruction a token may reach another expert (below), whose linears then group otherwise
    mine, theirs = ([(r["block"], r["layer"]) for r in rep["layers"]] for rep in (report, single))
    assert mine == theirs if reconstruct == "none" else sorted(mine) == sorted(theirs)
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys() and any(".experts.63." in key for key in a)  # as stored: a matrix per expert
    differ = sum(int(((a[n] == 0) != (b[n] == 0)).sum()) for n in a)
    pruned = (report["metrics"]["pruned"]["perplexity"], single["metrics"]["pruned"]["perplexity"])
    if method == "wanda" and reconstruct == "none":
        assert differ == 0 and pruned[0] == pytest.approx(pruned[1], rel=1e-5)
    elif reconstruct == "none":  # an expert with a few tokens has a near-singular Hessian: H⁻¹ may swap a tie
        assert differ <= 1e-5 * single["sparsity"]["numel"] and pruned[0] == pytest.approx(pruned[1], rel=1e-4)
    else:
        assert all(torch.equal(a[n] == 0, b[n] == 0) for n in a if ".0.self_attn." in n)  # from dense statistics
        # later statistics come from reconstructed outputs that agree to ~1e-4, and a router's top-2 turns such
        # a difference into a token sent to another expert: whole groups of an expert's weights then differ
        assert differ <= 1e-2 * single["sparsity"]["numel"] and pruned[0] == pytest.approx(pruned[1], rel=5e-3)
        for mine, theirs in zip(report["reconstruction"]["submodels"], single["reconstruction"]["submodels"]):
            assert mine["loss_heldout_after"] == pytest.approx(theirs["loss_heldout_after"], rel=2e-2)
    assert report["sparsity"]["sparsity"] == pytest.approx(single["sparsity"]["sparsity"], abs=1e-9)


def test_a_parameter_no_process_has_a_gradient_for_keeps_none(monkeypatch):
    """Data parallel: AdamW must skip a routed expert that no window of the step reached, as in one process; a
    zero gradient would move it (momentum, weight decay). Another process is simulated by what it adds."""
    others = {3: torch.tensor([0.0, 1.0, 0.0])}  # the other process has a gradient for the second parameter only
    monkeypatch.setattr(distributed, "size", lambda: 2)
    monkeypatch.setattr(distributed, "all_sum", lambda t: t.add_(others.get(len(t), torch.zeros_like(t))))
    reached, elsewhere, unreached = (torch.nn.Parameter(torch.ones(2)) for _ in range(3))  # 2: not a flag vector
    reached.grad = torch.full((2,), 2.0)
    distributed.all_sum_grads([reached, elsewhere, unreached])
    assert torch.equal(reached.grad, torch.full((2,), 2.0))
    assert torch.equal(elsewhere.grad, torch.zeros(2))  # this process's part: zeros, summed with the other's
    assert unreached.grad is None


def test_data_parallel_refusals(tiny_dir, tokenizer, texts, tmp_path):
    done = torchrun(run_args(tiny_dir, texts, tmp_path / "out", "--samples", "1"))
    assert done.returncode != 0 and "2 processes but only 1 calibration windows" in done.stderr
    # a launcher that gives process 1 another sparsity
    script = tmp_path / "uneven.py"
    script.write_text("import os, sys\nfrom prunelab.cli import app\nsys.argv = ['prunelab', *sys.argv[1:]]\n"
                      "if os.environ['RANK'] == '1':\n    sys.argv += ['--sparsity', '0.6']\napp()\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), *run_args(tiny_dir, texts, tmp_path / "out")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0 and "process 1 was started with a different config than process 0" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device, local, message", [
    ("cuda", "1", "torchrun started 2 processes on this node but it has 1 CUDA device(s): use --nproc-per-node 1"),
    ("cuda:0", "0", "--device cuda:0 under torchrun would put all 2 processes of a node on one GPU"),
])
def test_processes_without_a_gpu_each_are_refused_before_joining(monkeypatch, device, local, message):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: pytest.fail("set_device reached"))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: pytest.fail("process group joined"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", local)
    with pytest.raises(PrunelabError, match=message.replace("(", r"\(").replace(")", r"\)")):
        distributed.start(torch.device(device))


@pytest.mark.harness
@pytest.mark.parametrize("method", ["full", "masklora"])
def test_two_processes_retrain_and_score_tasks_like_one(tiny_dir, texts, tmp_path, monkeypatch, method):
    """Retraining's step windows split between the processes, gradients summed; the zero-shot tasks scored by
    process 0 on the model every process holds."""
    from test_zeroshot import write_task

    from prunelab.evaluate.zeroshot import CONVERSION, OFFLINE_TASKS
    cache = tmp_path / "cache"
    tasks = cache / "tasks" / f"bigbench-mc-{CONVERSION}"
    tasks.mkdir(parents=True)
    for name in OFFLINE_TASKS:
        write_task(tasks, name)
    extra = ["--retrain", method, "--retrain-tokens", str(12 * 32), "--retrain-batch", "2", "--retrain-accumulate",
             "2", "--retrain-lr", "1e-3", "--retrain-heldout", "3", "--retrain-evals", "2", "--lora-rank", "4",
             "--tasks", "bb_timedial", "--task-limit", "0"]
    monkeypatch.setenv("PRUNELAB_CACHE", str(cache))
    in_process(run_args(tiny_dir, texts, tmp_path / "p1", *extra))
    done = torchrun(run_args(tiny_dir, texts, tmp_path / "p2", *extra))
    assert done.returncode == 0, done.stderr[-3000:]
    runs = {n: json.loads((tmp_path / f"p{n}" / "prunelab.json").read_text()) for n in (1, 2)}
    one, two = runs[1]["retraining"], runs[2]["retraining"]
    assert (one["steps"], one["tokens_seen"]) == (two["steps"], two["tokens_seen"]) == (3, 12 * 32)
    assert two["heldout_loss_after"] < two["heldout_loss_before"]
    for a, b in zip(one["curve"]["train"] + one["curve"]["heldout"], two["curve"]["train"] + two["curve"]["heldout"]):
        assert a[:2] == b[:2] and a[2] == pytest.approx(b[2], rel=1e-4)
    a, b = load_file(tmp_path / "p1" / "model.safetensors"), load_file(tmp_path / "p2" / "model.safetensors")
    for name in runs[1]["sparsity"]["layers"]:
        assert torch.equal(a[name] == 0, b[name] == 0), name  # the mask kept in both
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-5)
    assert runs[2]["metrics"]["zeroshot"]["tasks"] == runs[1]["metrics"]["zeroshot"]["tasks"]
    assert runs[2]["metrics"]["zeroshot"]["tasks"]["bb_timedial"]["examples"] == 5


def test_share_of_windows():
    assert share(7, "calibration") == slice(0, 7)  # one process: all of them
    with pytest.raises(PrunelabError, match="2 processes but only 1 calibration"):
        from unittest import mock
        with mock.patch("prunelab.distributed.size", return_value=2):
            share(1, "calibration")


KILL_AFTER = """
import os, signal, sys
from prunelab.cli import app
from prunelab.recover.reconstruct import Reconstructor
from prunelab.resume import Checkpoints
Checkpoints.every_seconds = 0.0
real, calls = Reconstructor._submodel, []
def submodel(self, *a, **k):
    if len(calls) == int(os.environ["KILL_AFTER"]):
        os.kill(os.getpid(), signal.SIGKILL)
    calls.append(1)
    return real(self, *a, **k)
Reconstructor._submodel = submodel
sys.argv = ["prunelab", *sys.argv[1:]]
app()
"""


@pytest.mark.parametrize("streamed, latest", [(False, 3), (True, 2)])  # streamed: checkpoints between blocks
def test_two_processes_killed_then_resumed_give_the_same_weights(tiny_dir, texts, tmp_path, streamed, latest):
    """kill -9 of both processes in submodel 4 (each checkpoints its own activations), then the same torchrun
    with --resume: the same files, bit for bit, as two processes that were never interrupted."""
    recon = ["--reconstruct", "attn-mlp", "--lr", "1e-3", "--heldout", "4", "--batch-size", "2", "--no-eval-dense",
             *(["--max-memory", "3e-4"] if streamed else [])]
    args = run_args(tiny_dir, texts, tmp_path / "killed", *recon)
    script = tmp_path / "kill_after.py"
    script.write_text(KILL_AFTER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1", KILL_AFTER="3")
    killed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(script), *args], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0
    folder = checkpoint_folder(tmp_path / "killed")
    name = f"state-{latest:05d}"
    assert sorted(p.name for p in folder.glob("state-*")) == [
        f"{name}.json", f"{name}.rank1.json", f"{name}.rank1.safetensors", f"{name}.safetensors"]
    assert json.loads((folder / "run.json").read_text())["processes"] == 2
    one = CliRunner().invoke(app, [*args, "--resume"])
    assert one.exit_code != 0 and "processes was 2 in the interrupted run, now 1" in one.output

    resumed = torchrun([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = torchrun(run_args(tiny_dir, texts, tmp_path / "whole", *recon))
    assert whole.returncode == 0, whole.stderr[-3000:]
    report = json.loads((tmp_path / "killed" / "prunelab.json").read_text())
    assert report["reconstruction"]["resumed_after"] == latest and not folder.exists()
    assert bool(report["model"].get("streamed")) == streamed
    files = sorted(p.name for p in (tmp_path / "whole").glob("*.safetensors"))
    assert files == sorted(p.name for p in (tmp_path / "killed").glob("*.safetensors")) and len(files) >= 1
    for file in files:
        a, b = load_file(tmp_path / "whole" / file), load_file(tmp_path / "killed" / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file


@pytest.mark.parametrize("method", [
    ["--method", "flap", "--ratio", "0.25"],
    ["--method", "flap", "--ratio", "0.25", "--reconstruct", "attn-mlp", "--lr", "1e-3", "--heldout", "4",
     "--batch-size", "2"],
    ["--method", "layers", "--remove", "2", "--metric", "bi"],
    ["--method", "layers", "--remove", "1", "--metric", "taylor", "--protect-first", "0", "--protect-last", "0"],
    ["--method", "layers", "--remove", "1", "--metric", "ppl", "--no-compensation"],
], ids=["flap", "flap+attn-mlp", "layers-bi", "layers-taylor", "layers-ppl"])
def test_two_processes_prune_structure_like_one(tokenizer, texts, tmp_path, method):
    """FLAP's fluctuations and the depth scores (block influence, Taylor gradients, losses without a block)
    summed over processes: the same units and blocks go as in one process."""
    folder = tmp_path / "tiny-4"
    tiny_model("llama", layers=4).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    in_process(run_args(folder, texts, tmp_path / "p1", *method))
    done = torchrun(run_args(folder, texts, tmp_path / "p2", *method))
    assert done.returncode == 0, done.stderr[-3000:]
    runs = {n: json.loads((tmp_path / f"p{n}" / "prunelab.json").read_text()) for n in (1, 2)}
    one, two = runs[1], runs[2]
    assert two["data"]["processes"]["world_size"] == 2 and "processes" not in one["data"]
    if "flap" in method:
        assert [layer["removed"] for layer in two["structure"]["layers"]] == \
            [layer["removed"] for layer in one["structure"]["layers"]]
        kept = [json.loads((tmp_path / f"p{n}" / "prunelab_structure.json").read_text()) for n in (1, 2)]
        assert kept[0] == kept[1]  # the same rows and columns of every narrowed linear
    else:
        assert two["structure"]["removed"] == one["structure"]["removed"]
        for mine, theirs in zip(two["structure"]["steps"], one["structure"]["steps"]):
            assert mine["scores"] == pytest.approx(theirs["scores"], rel=1e-5)
    tolerance = 5e-3 if "attn-mlp" in method else 1e-5
    assert two["metrics"]["pruned"]["perplexity"] == pytest.approx(one["metrics"]["pruned"]["perplexity"],
                                                                   rel=tolerance)
