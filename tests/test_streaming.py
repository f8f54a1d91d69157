"""Models larger than memory: streamed block by block, with the same result as loaded whole."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import tiny_model
from transformers import AutoModelForCausalLM

import prunelab
import prunelab.job
from prunelab.config import RunConfig
from prunelab.errors import PrunelabError, PrunelabWarning
from prunelab.evaluate.sparsity import sparsity_of_saved
from prunelab.job import evaluate_model
from prunelab.models import layout
from prunelab.models.adapters import find_adapter
from prunelab.models.conv1d import released
from prunelab.models.layout import expert_groups
from prunelab.models.loading import float_dtype_of
from prunelab.streaming import Checkpoint

TINY_BUDGET = 3e-4  # GB: more than one block of these tiny models (0.15 MB in float32), less than the model


@pytest.fixture(params=["llama", "qwen3"])
def four_blocks(request, tmp_path, tokenizer):
    folder = tmp_path / f"tiny-{request.param}"
    model = tiny_model(request.param, layers=4)
    with released(model):  # GPT-2's Conv1D layers as its checkpoints store them
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run(model_dir, texts, out, **overrides):
    calib, evaluation = texts
    values = dict(model=str(model_dir), calib=str(calib), eval=str(evaluation), samples=8, seqlen=32,
                  eval_seqlen=32, eval_windows=4, forward_batch=4, out=str(out), reconstruct="none")
    values.update(overrides)
    return prunelab.run(values, progress=False)


def state(folder):
    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        found.update(load_file(file))
    return found


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_streamed_run_equals_the_whole_model_run(four_blocks, texts, tmp_path, method):
    whole = run(four_blocks, texts, tmp_path / "whole", method=method)
    streamed = run(four_blocks, texts, tmp_path / "streamed", method=method, max_memory=TINY_BUDGET)
    assert "streamed" not in whole["model"] and streamed["model"]["streamed"]["shards"] == 5
    out = tmp_path / "streamed"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 5
    expected, got = state(tmp_path / "whole"), state(out)
    assert expected.keys() == got.keys()
    assert all(expected[k].equal(got[k]) for k in expected), [k for k in expected if not expected[k].equal(got[k])]
    for key in ("dense", "pruned"):
        assert streamed["metrics"][key]["perplexity"] == pytest.approx(whole["metrics"][key]["perplexity"], rel=1e-5)
    assert streamed["sparsity"]["sparsity"] == whole["sparsity"]["sparsity"]
    assert streamed["sparsity"]["zeros_before"] == whole["sparsity"]["zeros_before"]
    assert [r["layer"] for r in streamed["layers"]] == [r["layer"] for r in whole["layers"]]
    reloaded = AutoModelForCausalLM.from_pretrained(out)  # an ordinary sharded checkpoint
    for w in find_adapter(reloaded).prunable_weights().values():
        assert (w == 0).float().mean() == pytest.approx(0.5, abs=1e-3)


def test_eval_streams_a_model_larger_than_the_budget(four_blocks, texts, tmp_path):
    from typer.testing import CliRunner

    from prunelab.cli import app
    run(four_blocks, texts, tmp_path / "pruned")
    args = ["eval", "--model", str(tmp_path / "pruned"), "--eval", str(texts[1]), "--eval-seqlen", "32",
            "--eval-windows", "4", "--json"]
    whole = CliRunner().invoke(app, args)
    streamed = CliRunner().invoke(app, [*args, "--max-memory", str(TINY_BUDGET)])
    assert whole.exit_code == 0 and streamed.exit_code == 0, streamed.output
    a, b = (json.loads(r.stdout[r.stdout.index("{"):]) for r in (whole, streamed))
    assert b["streamed"] and "streamed" not in a
    assert b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-5) and b["sparsity"] == a["sparsity"]


@pytest.mark.parametrize("four_blocks", ["llama", "qwen3", "opt", "gpt2"], indirect=True)  # opt: heads by their
# count; gpt2: Conv1D layers stored [in, out], q, k and v fused
@pytest.mark.parametrize("structure", ["adaptive", "uniform"])
def test_streamed_flap_equals_the_whole_model_run(four_blocks, texts, tmp_path, structure):
    """FLAP of a model larger than the budget: statistics pass, choice over all layers, narrowing pass; the
    same units go, the same narrowed (and bias-compensated) weights are written, and both evaluate alike."""
    from typer.testing import CliRunner

    from prunelab.cli import app
    from prunelab.models.narrow import read_structure
    width = {"ratio": 0.25, "structure": structure}
    whole = run(four_blocks, texts, tmp_path / "whole", method="flap", width=width, speed=False)
    streamed = run(four_blocks, texts, tmp_path / "streamed", method="flap", width=width, max_memory=TINY_BUDGET)
    assert "streamed" not in whole["model"] and streamed["model"]["streamed"]["shards"] == 5
    assert "speed" not in streamed["metrics"] and streamed["model"]["streamed"]["speed"].startswith("not measured")
    assert streamed["structure"]["layers"] == whole["structure"]["layers"]
    assert any(layer["removed"] for layer in whole["structure"]["layers"])
    assert read_structure(tmp_path / "streamed") == read_structure(tmp_path / "whole")
    for key in ("parameters_before", "parameters_after", "parameters_saved"):
        assert streamed["structure"][key] == whole["structure"][key], key
    assert whole["structure"]["parameters_after"] < whole["structure"]["parameters_before"]
    expected, got = state(tmp_path / "whole"), state(tmp_path / "streamed")
    assert expected.keys() == got.keys() and any(k.endswith(".bias") for k in got)  # compensation biases
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
    for key in ("dense", "pruned"):
        assert streamed["metrics"][key]["perplexity"] == pytest.approx(whole["metrics"][key]["perplexity"], rel=1e-5)
    # the narrowed output streams in `prunelab eval` too
    args = ["eval", "--model", str(tmp_path / "streamed"), "--eval", str(texts[1]), "--eval-seqlen", "32",
            "--eval-windows", "4", "--json", "--max-memory", str(TINY_BUDGET)]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout[done.stdout.index("{"):])
    assert result["perplexity"] == pytest.approx(whole["metrics"]["pruned"]["perplexity"], rel=1e-5)



@pytest.mark.parametrize("four_blocks", ["gpt2"], indirect=True)
@pytest.mark.parametrize("streamed", [False, True])
def test_flap_a_block_would_not_follow_is_refused_before_any_work(four_blocks, texts, tmp_path, streamed,
                                                                  monkeypatch):
    """The width probe runs in a job, loaded and streamed (block 0 read for it): with GPT-2's `split_size` left
    stale by a broken `recount`, the run is refused in one line before the dense evaluation, and nothing is
    written."""
    from prunelab.models import adapters

    monkeypatch.setattr(adapters.LlamaAdapter, "recount", lambda self, block: None)
    with pytest.raises(PrunelabError, match="GPT2Block: with a head removed its attention does not compute"):
        run(four_blocks, texts, tmp_path / "out", method="flap", **({"max_memory": TINY_BUDGET} if streamed else {}))
    assert not (tmp_path / "out").exists()

@pytest.mark.parametrize("depth", [
    {"remove": 2, "metric": "bi"},
    {"remove": 2, "metric": "bi", "one_shot": True},
    {"remove": 1, "metric": "mag", "protect_first": 0, "protect_last": 0},
    {"remove": 2, "metric": "bi", "compensation": False},
], ids=["bi", "bi-one-shot", "mag", "bi-no-compensation"])
def test_streamed_layer_removal_equals_the_whole_model_run(four_blocks, texts, tmp_path, depth):
    """Each round one pass over the streamed blocks, the compensation kept as scale factors: the same blocks
    go, and the kept ones are written renumbered with the same (compensated) weights."""
    whole = run(four_blocks, texts, tmp_path / "whole", method="layers", depth=depth, speed=False)
    streamed = run(four_blocks, texts, tmp_path / "streamed", method="layers", depth=depth, max_memory=TINY_BUDGET)
    assert "streamed" not in whole["model"] and streamed["model"]["streamed"]
    ours, theirs = streamed["structure"], whole["structure"]
    assert ours["removed"] == theirs["removed"] and ours["kept"] == theirs["kept"] and len(ours["kept"]) == 4 - depth[
        "remove"]
    for mine, other in zip(ours["steps"], theirs["steps"]):
        assert mine["removed"] == other["removed"]
        assert mine["scores"] == pytest.approx(other["scores"], rel=1e-5)
        assert mine["scale"] == (pytest.approx(other["scale"], rel=1e-5) if other["scale"] else None)
    for key in ("parameters_before", "parameters_after", "parameters_saved"):
        assert ours[key] == theirs[key], key
    expected, got = state(tmp_path / "whole"), state(tmp_path / "streamed")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
    for key in ("dense", "pruned"):
        assert streamed["metrics"][key]["perplexity"] == pytest.approx(whole["metrics"][key]["perplexity"], rel=1e-5)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")  # an ordinary sharded checkpoint
    assert reloaded.config.num_hidden_layers == len(ours["kept"])


@pytest.mark.parametrize("budget", [None, TINY_BUDGET])  # loaded whole: refused before any work; streamed: as written
def test_weights_beyond_float16s_range_are_refused_for_a_float16_output(tmp_path, tokenizer, texts, budget,
                                                                        monkeypatch):
    folder, out = tmp_path / "big", tmp_path / "out"
    model = tiny_model("llama", layers=3)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[0, 0] = 1e5
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if budget is None:
        monkeypatch.setattr(prunelab.job.Job, "evaluate", lambda *a: pytest.fail("the dense evaluation started"))
    with pytest.raises(PrunelabError, match=r"model.layers.2.mlp.down_proj.weight holds values up to 1e\+05, beyond "
                                            r"float16's range \(65504\): save in bfloat16 or float32 \(--save-dtype\)"):
        run(folder, texts, out, save_dtype="float16", max_memory=budget)
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    monkeypatch.undo()
    run(folder, texts, out, save_dtype="bfloat16", max_memory=budget)  # bfloat16 has float32's range


def test_the_stored_dtype_is_that_of_most_of_the_numbers(tmp_path):
    # DeepSeek-V3 keeps its routers' score-correction biases in float32 beside bfloat16 weights
    save_file({"a.e_score_correction_bias": torch.zeros(8), "b.weight": torch.zeros(64, 64, dtype=torch.bfloat16)},
              tmp_path / "model.safetensors")
    assert float_dtype_of([tmp_path / "model.safetensors"]) == Checkpoint(tmp_path).dtype == torch.bfloat16


@pytest.mark.parametrize("stored, held, save_dtype, saved", [
    (torch.bfloat16, "float32", "auto", torch.bfloat16),  # the input's dtype
    (torch.bfloat16, "float32", "float32", torch.float32),  # asked for
    (torch.float32, "bfloat16", "auto", torch.bfloat16),  # held in a narrower one: what the weights are
    (torch.float32, "float32", "bfloat16", torch.bfloat16),  # the embedding, norms and head rounded too
    ("mixed", "float32", "auto", torch.bfloat16),  # bfloat16 with a few small tensors kept in float32
])
def test_a_checkpoint_is_saved_in_one_dtype_loaded_and_streamed(tmp_path, tokenizer, texts, stored, held, save_dtype,
                                                                saved):
    folder = tmp_path / "input"
    mixed, stored = stored == "mixed", torch.bfloat16 if stored == "mixed" else stored
    tiny_model("llama", layers=3).to(stored).save_pretrained(folder, max_shard_size="100KB")
    tokenizer.save_pretrained(folder)
    if mixed:  # one outside the blocks, one inside
        keep_in_float32(folder, ["model.norm.weight", "model.layers.1.input_layernorm.weight"])
    assert (folder / "model.safetensors.index.json").is_file()  # the input is sharded too
    # SparseGPT updates the kept weights in float32, so the rounding to bfloat16 is not a no-op
    options = dict(method="sparsegpt", model_dtype=held, save_dtype=save_dtype)
    whole = run(folder, texts, tmp_path / "whole", **options)
    streamed = run(folder, texts, tmp_path / "streamed", max_memory=TINY_BUDGET / (2 if held == "bfloat16" else 1),
                   **options)
    assert "streamed" in streamed["model"]
    expected, got = state(tmp_path / "whole"), state(tmp_path / "streamed")
    assert {t.dtype for t in got.values()} == {t.dtype for t in expected.values()} == {saved}
    assert all(expected[k].equal(got[k]) for k in expected), [k for k in expected if not expected[k].equal(got[k])]
    for name, report in (("whole", whole), ("streamed", streamed)):
        assert (report["model"]["stored_dtype"], report["model"]["saved_dtype"]) == (str(stored)[6:], str(saved)[6:])
        assert json.loads((tmp_path / name / "config.json").read_text())["dtype"] == str(saved)[6:]
    assert streamed["metrics"]["pruned"]["perplexity"] == pytest.approx(whole["metrics"]["pruned"]["perplexity"],
                                                                        rel=1e-5)
    assert sparsity_of_saved(tmp_path / "streamed", list(streamed["sparsity"]["layers"]))["sparsity"] == 0.5


def test_what_the_class_keeps_in_float32_is_held_and_saved_so_loaded_and_streamed(tmp_path, tokenizer, texts):
    """DeepSeek-V3 routes in float32 (`_keep_in_fp32_modules_strict`): `from_pretrained` holds its routers in float32
    beside bfloat16 weights, and so does a streamed block; both save them in float32 (reconstruction trains them,
    and rounding them to bfloat16 once moved the loaded run's routing away from what it measured)."""
    folder = tmp_path / "input"
    tiny_model("deepseek_v3", layers=4).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    options = dict(model_dtype="bfloat16", reconstruct={"granularity": "attn-mlp", "heldout": 2, "lr": 1e-3,
                                                        "precision": "float32"})
    whole = run(folder, texts, tmp_path / "whole", **options)
    streamed = run(folder, texts, tmp_path / "streamed", max_memory=2.5e-4 / 2, **options)
    assert "streamed" in streamed["model"] and whole["model"]["saved_dtype"] == "bfloat16"
    expected, got = state(tmp_path / "whole"), state(tmp_path / "streamed")
    # what transformers holds in float32 (its list grew: the correction biases in 5.17, the router weights too later)
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).state_dict()
    kept = {k for k, t in loaded.items() if t.dtype == torch.float32}
    assert kept and {k for k in expected if expected[k].dtype == torch.float32} == kept
    assert {k: t.dtype for k, t in got.items()} == {k: t.dtype for k, t in expected.items()}
    routers = [k for k in kept if k.endswith(".weight")]  # trained by reconstruction, in float32
    assert all(not expected[k].equal(expected[k].bfloat16().float()) for k in routers)
    assert all(expected[k].equal(got[k]) for k in expected), [k for k in expected if not expected[k].equal(got[k])]
    again = evaluate_model(RunConfig.from_dict(dict(model=str(tmp_path / "whole"), eval=str(texts[1]), eval_seqlen=32,
                                                    eval_windows=4, model_dtype="bfloat16")))
    for report in (whole, streamed):
        assert report["metrics"]["pruned"]["perplexity"] == pytest.approx(again["perplexity"], rel=1e-6)


def keep_in_float32(folder, names):
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    for file in {index[name] for name in names}:
        tensors = load_file(folder / file)
        # values bfloat16 cannot hold, so that rounding them shows
        tensors = {n: t.float() * torch.linspace(0.9, 1.1, t.numel()).view_as(t) if n in names else t
                   for n, t in tensors.items()}
        save_file(tensors, folder / file, metadata={"format": "pt"})


def test_vocabulary_matrices_larger_than_a_block_get_a_shard_each(tmp_path, tokenizer, texts):
    # an 8B Llama's embedding and head take 1 GB each: written together they would be 2 GB in memory at once
    folder = tmp_path / "untied"
    tiny_model("llama", layers=2, vocab_size=4096, tie_word_embeddings=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    whole = run(folder, texts, tmp_path / "whole")
    streamed = run(folder, texts, tmp_path / "streamed", max_memory=TINY_BUDGET)
    files = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())["weight_map"]
    assert streamed["model"]["streamed"]["shards"] == len(set(files.values())) == 2 + 2
    assert files["model.embed_tokens.weight"] != files["lm_head.weight"]
    assert files["model.norm.weight"] in {files["model.embed_tokens.weight"], files["lm_head.weight"]}
    expected, got = state(tmp_path / "whole"), state(tmp_path / "streamed")
    assert expected.keys() == got.keys() and all(expected[k].equal(got[k]) for k in expected)
    assert streamed["metrics"]["pruned"]["perplexity"] == pytest.approx(whole["metrics"]["pruned"]["perplexity"],
                                                                        rel=1e-5)


@pytest.mark.parametrize("reconstruct", ["none", "attn-mlp"])
def test_streamed_channel_permutation_equals_the_whole_model_run(four_blocks, texts, tmp_path, reconstruct):
    # streamed, the writer's inputs are not kept: the reordered half runs again instead
    kwargs = dict(pattern="2:4", permute=True, reconstruct={"granularity": reconstruct, "lr": 1e-3, "heldout": 4},
                  eval_dense=False)
    whole = run(four_blocks, texts, tmp_path / "whole", **kwargs)
    streamed = run(four_blocks, texts, tmp_path / "streamed", max_memory=TINY_BUDGET, **kwargs)
    expected, got = state(tmp_path / "whole"), state(tmp_path / "streamed")
    assert all(expected[k].equal(got[k]) for k in expected)
    assert [r["permuted"] for r in streamed["layers"] if "permuted" in r] == \
        [r["permuted"] for r in whole["layers"] if "permuted" in r] != []
    assert streamed["metrics"]["pruned"]["perplexity"] == pytest.approx(whole["metrics"]["pruned"]["perplexity"],
                                                                        rel=1e-5)


@pytest.mark.parametrize("granularity, loss", [("attn-mlp", "mse"), ("blocks:2", "cmse")])
def test_streamed_reconstruction_equals_the_whole_model_run(four_blocks, texts, tmp_path, granularity, loss):
    kwargs = dict(reconstruct={"granularity": granularity, "lr": 1e-3, "heldout": 4, "loss": loss}, eval_dense=False)
    whole = run(four_blocks, texts, tmp_path / "whole", **kwargs)
    streamed = run(four_blocks, texts, tmp_path / "streamed", max_memory=TINY_BUDGET, **kwargs)
    expected, got = state(tmp_path / "whole"), state(tmp_path / "streamed")
    assert all(expected[k].equal(got[k]) for k in expected)
    assert [r["loss_heldout_after"] for r in streamed["reconstruction"]["submodels"]] == \
        [r["loss_heldout_after"] for r in whole["reconstruction"]["submodels"]]
    assert streamed["metrics"]["pruned"]["perplexity"] == pytest.approx(whole["metrics"]["pruned"]["perplexity"],
                                                                        rel=1e-5)


@pytest.mark.parametrize("reconstruct", ["none", "attn-mlp"])
def test_streamed_owl_plans_and_prunes_as_loaded_whole(four_blocks, texts, tmp_path, reconstruct):
    kwargs = dict(layerwise="owl", owl={"spread": 0.1}, eval_dense=False,
                  reconstruct={"granularity": reconstruct, "lr": 1e-3, "heldout": 4})
    whole = run(four_blocks, texts, tmp_path / "whole", **kwargs)
    streamed = run(four_blocks, texts, tmp_path / "streamed", max_memory=TINY_BUDGET, **kwargs)
    assert streamed["model"]["streamed"]
    plan = sorted({(r["block"], r["target"], r["outlier_share"]) for r in whole["layers"]})
    assert sorted({(r["block"], r["target"], r["outlier_share"]) for r in streamed["layers"]}) == plan
    assert len(plan) == 4 and max(p[1] for p in plan) - min(p[1] for p in plan) > 0.05
    expected, got = state(tmp_path / "whole"), state(tmp_path / "streamed")
    assert all(expected[k].equal(got[k]) for k in expected)
    assert streamed["sparsity"]["sparsity"] == whole["sparsity"]["sparsity"]
    report = (tmp_path / "streamed" / "REPORT.md").read_text()
    assert "## Sparsity per block (layerwise owl)" in report and "| 3 |" in report


@pytest.mark.parametrize("family", ["gpt_neox", "phi"])
def test_streamed_parallel_blocks_reconstruct_as_loaded_whole(tmp_path, tokenizer, texts, family):
    """Attention and MLP side by side: each block one submodel, brought in and out once, streamed or not."""
    folder = tmp_path / family
    tiny_model(family, layers=4).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    kwargs = dict(reconstruct={"lr": 1e-3, "heldout": 4}, eval_dense=False)
    whole = run(folder, texts, tmp_path / "whole", **kwargs)
    streamed = run(folder, texts, tmp_path / "streamed", max_memory=TINY_BUDGET, **kwargs)
    assert [r["submodel"] for r in streamed["reconstruction"]["submodels"]] == [f"block {i}" for i in range(4)]
    assert "Trained whole (block 0, block 1, block 2, block 3): attention and MLP side by side" in \
        (tmp_path / "streamed" / "REPORT.md").read_text()
    expected, got = state(tmp_path / "whole"), state(tmp_path / "streamed")
    assert expected.keys() == got.keys() and all(expected[k].equal(got[k]) for k in expected)
    assert streamed["metrics"]["pruned"]["perplexity"] == pytest.approx(whole["metrics"]["pruned"]["perplexity"],
                                                                        rel=1e-5)


@pytest.mark.parametrize("family, config", [
    ("opt", dict(word_embed_proj_dim=32, do_layer_norm_before=False)),  # OPT-350m's: embeddings narrower than the
    ("bloom", {}), ("falcon", {}),  # blocks, post-LN; blocks that return a tuple, whose first item the loop takes
])
def test_unusual_layouts_stream_as_loaded_whole(tmp_path, tokenizer, texts, family, config):
    folder = tmp_path / family
    tiny_model(family, layers=4, **config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    whole = run(folder, texts, tmp_path / "whole")
    streamed = run(folder, texts, tmp_path / "streamed", max_memory=TINY_BUDGET)
    assert "streamed" in streamed["model"]
    expected, got = state(tmp_path / "whole"), state(tmp_path / "streamed")
    assert expected.keys() == got.keys() and all(expected[k].equal(got[k]) for k in expected)
    for key in ("dense", "pruned"):
        assert streamed["metrics"][key]["perplexity"] == pytest.approx(whole["metrics"][key]["perplexity"], rel=1e-5)


@pytest.mark.harness
def test_streamed_zero_shot_equals_the_whole_model(four_blocks, texts, tmp_path, monkeypatch):
    """--tasks on a model larger than the budget: lm-eval's requests go through one block at a time, in several
    passes over the model (a quarter of this budget holds ~290 tokens), and score as the model in memory does,
    before and after pruning, in `run` and in `eval`."""
    from typer.testing import CliRunner

    from prunelab.cli import app
    from prunelab.evaluate import zeroshot

    words = "the river flows past old mill square water bridge market farmers town lights evening".split()
    data = tmp_path / "tasks"
    data.mkdir()
    with open(data / "arc_easy_val.jsonl", "w") as out:
        for n in range(16):
            question = " ".join(words[(n + k) % len(words)] for k in range(4 + n % 5))
            out.write(json.dumps({"id": str(n), "question": question, "answerKey": "ABC"[n % 3], "choices": {
                "text": [words[n % 7], f"{words[(n + 3) % 11]} {words[n % 5]}", words[(n + 5) % 13]],
                "label": ["A", "B", "C"]}}) + "\n")
    monkeypatch.setattr(zeroshot, "standard_task_dir", lambda: data)
    common = dict(tasks="arc_easy_val", task_limit=0, task_batch=5)
    whole = run(four_blocks, texts, tmp_path / "whole", **common)
    streamed = run(four_blocks, texts, tmp_path / "streamed", max_memory=TINY_BUDGET, **common)
    assert streamed["model"]["streamed"] and "streamed" not in whole["model"]
    for key in ("zeroshot_dense", "zeroshot"):
        a, b = whole["metrics"][key]["tasks"]["arc_easy_val"], streamed["metrics"][key]["tasks"]["arc_easy_val"]
        assert b["examples"] == a["examples"] == 16
        assert (b["acc"], b["acc_norm"]) == (a["acc"], a["acc_norm"])
        assert streamed["metrics"][key]["streamed_tokens_per_pass"] == 292  # a quarter of 3e5 bytes, 256 a token
    args = ["eval", "--model", str(tmp_path / "streamed"), "--tasks", "arc_easy_val", "--task-limit", "0", "--json"]
    result = CliRunner().invoke(app, [*args, "--max-memory", str(TINY_BUDGET)])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout[result.stdout.index("{"):])
    assert out["streamed"] and out["zeroshot"]["tasks"]["arc_easy_val"]["acc"] == whole["metrics"]["zeroshot"][
        "tasks"]["arc_easy_val"]["acc"]


def test_streamed_log_likelihoods_equal_the_model_in_memory(four_blocks, tokenizer):
    """The per-request numbers behind accuracy: log p(continuation) and greedy, streamed against a forward of
    the whole model, for sequences of different lengths padded into one batch."""
    from prunelab.streaming import StreamedModel, streamed_loglikelihoods

    model = AutoModelForCausalLM.from_pretrained(four_blocks).eval()
    inputs = [tokenizer("the river flows past the old mill")["input_ids"], tokenizer("a bridge")["input_ids"],
              tokenizer("every spring the farmers bring their goods to the market square")["input_ids"]]
    targets = [ids[-2:] for ids in inputs]
    inputs = [ids[:-1] for ids in inputs]  # position i predicts token i + 1: the last two predict the targets
    got = streamed_loglikelihoods(StreamedModel(four_blocks, torch.float32), inputs, targets, batch_size=3,
                                  progress=False)
    # the head in calls of 3 positions, which cut through requests: the same numbers
    chunked = streamed_loglikelihoods(StreamedModel(four_blocks, torch.float32), inputs, targets, batch_size=3,
                                      progress=False, positions=3)
    assert [g for _, g in chunked] == [g for _, g in got]
    assert [p for p, _ in chunked] == pytest.approx([p for p, _ in got], abs=1e-5)
    for ids, target, (logp, greedy) in zip(inputs, targets, got):
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -len(target):], -1)
        expected = log_probs.gather(-1, torch.tensor(target)[:, None]).sum().item()
        assert logp == pytest.approx(expected, abs=1e-4)
        assert greedy == bool((log_probs.argmax(-1) == torch.tensor(target)).all())


def test_streaming_refuses_what_it_cannot_do_before_any_work(four_blocks, texts, tmp_path):
    # the sizes in the units the budget is given in (a tiny model's 0.000594 GB was "0.0 GB")
    with pytest.raises(PrunelabError, match=r"take 0.000\d+ GB in float32, more than the memory budget 0.0003 GB "
                                            r"\(--max-memory\): it is streamed block by block, which does not support "
                                            r"--retrain"):
        run(four_blocks, texts, tmp_path / "out", retrain="full", max_memory=TINY_BUDGET)
    with pytest.raises(PrunelabError, match=r"which does not support depth metric taylor"):
        run(four_blocks, texts, tmp_path / "out", method="layers", depth={"remove": 1, "metric": "taylor"},
            max_memory=TINY_BUDGET)
    with pytest.raises(PrunelabError, match=r"which does not support reconstruction after flap"):
        run(four_blocks, texts, tmp_path / "out", method="flap", reconstruct="attn-mlp", max_memory=TINY_BUDGET)
    with pytest.raises(PrunelabError, match=r"budget 1e-05 GB \(--max-memory\) is smaller than one decoder block"):
        run(four_blocks, texts, tmp_path / "out", max_memory=1e-5)
    with pytest.raises(PrunelabError, match="max_memory must be > 0"):
        run(four_blocks, texts, tmp_path / "out", max_memory=0)
    with pytest.raises(PrunelabError, match=r"3:7 does not divide layer 0\.self_attn\.q_proj"):
        run(four_blocks, texts, tmp_path / "out", pattern="3:7", max_memory=TINY_BUDGET)
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_that_does_not_match_its_config_is_refused_before_any_work(four_blocks, texts, tmp_path):
    from safetensors.torch import save_file

    tensors = state(four_blocks)
    name = "model.layers.2.mlp.down_proj.weight"  # a block far from the first one read
    tensors[name] = tensors[name].t().contiguous()
    save_file(tensors, four_blocks / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PrunelabError, match=rf"{re.escape(name)} is stored with shape \[128, 64\], but its "
                                            r"config.json builds \[64, 128\]"):
        run(four_blocks, texts, tmp_path / "out", max_memory=TINY_BUDGET)
    assert not (tmp_path / "out").exists()


def test_stored_tensors_the_model_has_no_place_for_are_ignored_as_transformers_does(tmp_path, tokenizer, texts):
    from safetensors.torch import save_file

    folder = tmp_path / "llama"
    tiny_model("llama", layers=4).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    tensors = state(folder)
    for i in range(4):  # as older Llama conversions store them
        tensors[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    tensors["model.something_else"] = torch.ones(3)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    whole = run(folder, texts, tmp_path / "whole")
    with pytest.warns(prunelab.errors.PrunelabWarning, match=r"5 stored tensor\(s\) the model has no place for"):
        streamed = run(folder, texts, tmp_path / "streamed", max_memory=TINY_BUDGET)
    expected, got = state(tmp_path / "whole"), state(tmp_path / "streamed")
    assert expected.keys() == got.keys() and not any("inv_freq" in k or "something" in k for k in got)
    assert all(expected[k].equal(got[k]) for k in expected)
    assert streamed["metrics"]["pruned"]["perplexity"] == pytest.approx(whole["metrics"]["pruned"]["perplexity"])


def test_held_tensors_stored_as_one_are_written_together(tmp_path, tokenizer, texts):
    """Param2MoE stores q, k and v as one `query_key_value`: converted one at a time, each would overwrite it."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if "param2moe" not in CONFIG_MAPPING:
        pytest.skip("this transformers has no Param2MoE")
    config = CONFIG_MAPPING["param2moe"](vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                         moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    folder = tmp_path / "param2moe"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert any(k.endswith("attention.query_key_value.weight") for k in state(folder))
    whole = run(folder, texts, tmp_path / "whole")
    streamed = run(folder, texts, tmp_path / "streamed", max_memory=TINY_BUDGET)
    assert "streamed" in streamed["model"]
    expected, got = state(tmp_path / "whole"), state(tmp_path / "streamed")
    assert expected.keys() == got.keys() and all(expected[k].equal(got[k]) for k in expected)
    assert streamed["metrics"]["pruned"]["perplexity"] == pytest.approx(whole["metrics"]["pruned"]["perplexity"],
                                                                        rel=1e-5)


def test_a_checkpoint_without_a_tensor_outside_the_blocks_is_refused_before_any_work(four_blocks, texts, tmp_path):
    from safetensors.torch import save_file

    tensors = state(four_blocks)
    del tensors["model.norm.weight"]  # from_pretrained would draw it at random (and warn); streaming would crash
    save_file(tensors, four_blocks / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PrunelabError, match=r"tensor names do not follow the model's module tree \(no model.norm"):
        run(four_blocks, texts, tmp_path / "out", max_memory=TINY_BUDGET)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"])
def test_routed_experts_stored_per_expert_stream_as_loaded_whole(tmp_path, tokenizer, texts, monkeypatch, family):
    """transformers stores fused expert tensors one matrix per expert and projection and converts them on load
    and save; a streamed block goes through the same conversions, so the output is the whole-model run's. It
    reads them one expert at a time, so that a block's experts are never in memory in both layouts."""
    folder = tmp_path / f"tiny-{family}"
    tiny_model(family, layers=4).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    whole = run(folder, texts, tmp_path / "whole")
    reads, real_read = [], Checkpoint.read
    monkeypatch.setattr(Checkpoint, "read", lambda self, names: reads.append(names) or real_read(self, names))
    saved, real_to_stored = [], layout.to_stored
    monkeypatch.setattr(layout, "to_stored", lambda model, tensors: saved.extend(
        t.shape for n, t in tensors.items() if ".experts." in n and t.device.type != "meta") or
        real_to_stored(model, tensors))
    # a budget of 1.5 blocks: 0.67, 0.3, 0.22 and 0.25 MB; the models take 1.9, 0.93, 0.73 and 0.78 MB
    budget = {"mixtral": 6.7e-4, "qwen2_moe": 3e-4, "qwen3_moe": 2.2e-4, "deepseek_v3": 2.5e-4}[family]
    streamed = run(folder, texts, tmp_path / "streamed", max_memory=budget)
    assert streamed["model"]["streamed"]["shards"] == 5
    experts = [{int(n) for n in re.findall(r"\.experts\.(\d+)\.", " ".join(names))} for names in reads]
    assert max(len(e) for e in experts) == 1 and len({frozenset(e) for e in experts if e}) == 4  # each of 4
    assert saved and all(shape[0] == 1 for shape in saved)  # written one expert at a time too
    expected, got = state(tmp_path / "whole"), state(tmp_path / "streamed")
    assert any(".experts.0." in k for k in got) and expected.keys() == got.keys()  # per expert, as stored
    assert all(expected[k].equal(got[k]) for k in expected), [k for k in expected if not expected[k].equal(got[k])]
    for key in ("dense", "pruned"):
        assert streamed["metrics"][key]["perplexity"] == pytest.approx(whole["metrics"][key]["perplexity"], rel=1e-5)
    assert streamed["sparsity"]["layers"] == whole["sparsity"]["layers"]  # fused experts counted whole in both
    assert any(".experts." in name for name in streamed["sparsity"]["layers"])


def test_streamed_expert_permutation_equals_the_whole_model_run(tmp_path, tokenizer, texts):
    # the reordering writes through the per-expert views into the fused tensors, which are stored per expert
    folder = tmp_path / "tiny-qwen2_moe"
    tiny_model("qwen2_moe", layers=4).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    kwargs = dict(pattern="2:4", permute=True, eval_dense=False)
    whole = run(folder, texts, tmp_path / "whole", **kwargs)
    streamed = run(folder, texts, tmp_path / "streamed", max_memory=3e-4, **kwargs)
    assert streamed["model"]["streamed"]["shards"] == 5
    expected, got = state(tmp_path / "whole"), state(tmp_path / "streamed")
    assert expected.keys() == got.keys() and all(expected[k].equal(got[k]) for k in expected)
    permuted = {(r["block"], r["layer"]): r["permuted"] for r in streamed["layers"] if "permuted" in r}
    assert permuted == {(r["block"], r["layer"]): r["permuted"] for r in whole["layers"] if "permuted" in r}
    assert {(3, "mlp.experts.down_proj.0"), (3, "mlp.shared_expert.down_proj")} <= set(permuted)


def test_expert_groups_split_by_the_one_varying_number():
    keys = [f"model.layers.3.mlp.experts.{e}.{p}_proj.weight" for e in (10, 2, 0) for p in ("gate", "up")]
    assert expert_groups(keys, 3) == [keys[4:6], keys[2:4], keys[0:2]]  # by expert, in numeric order
    assert expert_groups(keys, 4) == [keys]  # three experts' keys for four rows: converted whole
    qkv = ["model.layers.3.attn.q.weight", "model.layers.3.attn.k.weight"]
    assert expert_groups(qkv, 1) == [qkv]  # nothing varies: converted together
    both = ["model.layers.3.experts.1.w.weight", "model.layers.4.experts.2.w.weight"]
    assert expert_groups(both, 2) == [both]  # two numbers vary: not one tensor's experts


def test_a_transformers_without_the_conversion_internals_is_refused_not_ignored(monkeypatch):
    """Taking per-expert tensors as stored would build a wrong block; a transformers whose internals moved
    gets a one-line error instead."""
    import sys
    import types

    model = tiny_model("qwen2_moe", layers=1)
    monkeypatch.setitem(sys.modules, "transformers.core_model_loading", types.ModuleType("moved"))
    with pytest.raises(PrunelabError, match="lacks the conversion internals"):
        layout.to_held(model, {"model.layers.0.mlp.experts.0.down_proj.weight": torch.zeros(8, 8)})


def test_an_expert_whose_pieces_do_not_match_the_checkpoint_keys_is_refused():
    model = tiny_model("qwen2_moe", layers=1)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    fused = model.get_parameter(name).detach()
    keys = [f"model.layers.0.mlp.experts.{e}.{p}_proj.weight" for e in range(len(fused)) for p in ("gate", "up")]
    parts = list(layout.to_stored_by_expert(model, name, fused, keys))
    assert len(parts) == len(fused) and parts[2][keys[4]].equal(fused[2].chunk(2)[0])  # expert 2's gate_proj
    wrong = [k.replace("gate_proj", "w1").replace("up_proj", "w3") for k in keys]  # Mixtral's names
    with pytest.raises(PrunelabError, match="one expert converts to"):
        list(layout.to_stored_by_expert(model, name, fused, wrong))


@pytest.mark.parametrize("granularity, blocks", [("attn-mlp", 1), ("blocks:2", 2), ("none", 0)])
def test_a_streamed_reconstruction_larger_than_the_budget_is_announced(tiny_dir, tmp_path, capsys, monkeypatch,
                                                                       granularity, blocks):
    """The budget check guards one block, which is what pruning holds; reconstruction holds ~4.5 blocks per block
    trained at once. A run that will go over gets a one-line warning before the work, and goes on."""
    import warnings

    from prunelab import distributed
    from prunelab.cli import _warn
    from prunelab.config import RunConfig
    from prunelab.errors import MemoryBudgetWarning
    from prunelab.job import RECONSTRUCTION_BLOCKS, streaming_source
    from prunelab.streaming import largest_block

    config = RunConfig.from_dict(dict(model=str(tiny_dir), max_memory=TINY_BUDGET, reconstruct=granularity,
                                      out=str(tmp_path / "out")))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, budget = streaming_source(config)
        assert streaming_source(config, saving=False)  # `prunelab eval` reconstructs nothing
    announced = [w for w in caught if issubclass(w.category, MemoryBudgetWarning)]
    assert len(announced) == (1 if blocks else 0)
    if blocks:
        need = float(re.search(r"about ([\d.]+) GB", str(announced[0].message)).group(1))
        block = largest_block(Checkpoint(tiny_dir).nbytes(torch.float32)) / 1e9
        assert need == pytest.approx(RECONSTRUCTION_BLOCKS * blocks * block, rel=1e-2) and need > budget
        _warn(announced[0].message, MemoryBudgetWarning, "job.py", 1)
        printed = capsys.readouterr().err
        assert printed.startswith("warning: ") and printed.count("\n") == 1 and "--max-memory" in printed
        monkeypatch.setattr(distributed, "is_main", lambda: False)  # torchrun's other processes: process 0 warns
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert streaming_source(config)
        assert not caught


@pytest.mark.parametrize("method", [dict(method="wanda", reconstruct="attn-mlp"),
                                    dict(method="layers", depth={"remove": 1, "metric": "bi"})],
                         ids=["wanda", "layers"])
def test_a_checkpoint_stored_under_other_names_streams_as_loaded_whole(tmp_path, tokenizer, texts, method):
    """A multimodal Gemma 3 is saved with its text model under `language_model.model.layers.N` and held as
    `model.language_model.layers.N`: the streamed run reads the blocks by their stored names and writes the
    output under them, as `save_pretrained` does."""
    from transformers import Gemma3Config

    config = Gemma3Config(
        text_config=dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4, head_dim=16,
                         num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                         layer_types=["sliding_attention", "full_attention"] * 2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        mm_tokens_per_image=4, image_token_index=299, boi_token_index=297, eoi_token_index=298)
    torch.manual_seed(0)
    folder = tmp_path / "tiny-gemma3-vision"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert any(key.startswith("language_model.model.layers.0.") for key in state(folder))  # stored otherwise
    whole = run(folder, texts, tmp_path / "whole", speed=False, **method)
    streamed = run(folder, texts, tmp_path / "streamed", max_memory=5e-4, **method)  # the model: 0.74 MB
    assert streamed["model"]["streamed"] and "streamed" not in whole["model"]
    expected, got = state(tmp_path / "whole"), state(tmp_path / "streamed")
    assert expected.keys() == got.keys() and any(k.startswith("language_model.model.layers.") for k in got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
    assert streamed["metrics"]["pruned"]["perplexity"] == pytest.approx(whole["metrics"]["pruned"]["perplexity"],
                                                                        rel=1e-5)
    if method["method"] == "wanda":
        assert streamed["sparsity"]["sparsity"] == whole["sparsity"]["sparsity"] == pytest.approx(0.5)
    else:
        assert streamed["structure"]["removed"] == whole["structure"]["removed"]


def multimodal_checkpoint(family: str, folder):
    """A tiny multimodal checkpoint whose text model `AutoModelForCausalLM` loads alone (the vision tower's tensors
    left out): Llama 4 stores it under `language_model.` (its text model's `base_model_prefix`), Qwen 3.5 under
    `model.language_model.` (a prefix its conversion mapping takes off on loading and puts back on saving), and
    Qwen 3.5-MoE its experts there too, one matrix per expert, fused on loading."""
    import transformers

    common = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16)
    if family == "llama4":
        config = transformers.Llama4Config(
            text_config=dict(common, intermediate_size=32, intermediate_size_mlp=128, num_local_experts=4,
                             num_experts_per_tok=1, interleave_moe_layer_step=2, attention_chunk_size=16,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=32, patch_size=8, vision_output_dim=64, projector_input_dim=64,
                               projector_output_dim=64), image_token_index=299)
        model, stored = transformers.Llama4ForConditionalGeneration(config), "language_model.model.layers.0."
    else:  # Qwen 3.5, dense or with routed experts stored one matrix per expert
        moe = family == "qwen3_5_moe"
        prefix = "Qwen3_5Moe" if moe else "Qwen3_5"
        if not hasattr(transformers, f"{prefix}Config"):
            pytest.skip(f"transformers {transformers.__version__} has no {prefix}")
        sizes = dict(moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4,
                     num_experts_per_tok=2) if moe else dict(intermediate_size=128)
        config = getattr(transformers, f"{prefix}Config")(
            text_config=dict(common, **sizes, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                             linear_num_value_heads=4, layer_types=["linear_attention", "full_attention"]),
            vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                               patch_size=8, num_position_embeddings=16))
        model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config)
        stored = "model.language_model.layers.0.mlp.experts.0." if moe else "model.language_model.layers.0."
    model.save_pretrained(folder)
    assert any(key.startswith(stored) for key in state(folder))


@pytest.mark.parametrize("family", ["llama4", "qwen3_5", "qwen3_5_moe"])
def test_a_multimodal_checkpoint_streams_into_its_text_model_as_loaded_whole(family, tmp_path, tokenizer, texts):
    """Meta's Llama 4 and Qwen's Qwen 3.5 checkpoints are multimodal: `AutoModelForCausalLM` loads their text model
    alone, under other names than they are stored under. The streamed run was refused ("names do not follow the
    model's module tree"); it reads them as loading does and writes what `save_pretrained` writes."""
    torch.manual_seed(0)
    folder = tmp_path / f"tiny-{family}-vision"
    multimodal_checkpoint(family, folder)
    tokenizer.save_pretrained(folder)
    options = dict(method="wanda", reconstruct="attn-mlp", speed=False)
    whole = run(folder, texts, tmp_path / "whole", **options)
    with pytest.warns(PrunelabWarning, match="stored tensor.* the model has no place for are ignored"):  # the vision
        streamed = run(folder, texts, tmp_path / "streamed", max_memory=5e-4, **options)
    assert streamed["model"]["streamed"] and "streamed" not in whole["model"]
    expected, got = state(tmp_path / "whole"), state(tmp_path / "streamed")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "streamed" / "config.json").read_text()) == json.loads(
        (tmp_path / "whole" / "config.json").read_text())
    assert streamed["sparsity"]["sparsity"] == whole["sparsity"]["sparsity"] == pytest.approx(0.5)
    assert streamed["metrics"]["pruned"]["perplexity"] == pytest.approx(whole["metrics"]["pruned"]["perplexity"],
                                                                        rel=1e-5)


def test_a_head_stored_apart_from_a_tied_embedding_stays_apart_when_streamed(tmp_path, tokenizer, texts):
    """A config that ties the head to the embedding, a checkpoint that stores both with different values:
    `from_pretrained` keeps them apart (and warns), so streaming must too."""
    folder = tmp_path / "apart"
    tiny_model("llama", layers=4, tie_word_embeddings=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    whole = run(folder, texts, tmp_path / "whole", method="wanda")
    streamed = run(folder, texts, tmp_path / "streamed", method="wanda", max_memory=TINY_BUDGET)
    assert streamed["model"]["streamed"]
    for key in ("dense", "pruned"):
        assert streamed["metrics"][key]["perplexity"] == pytest.approx(whole["metrics"][key]["perplexity"], rel=1e-5)


@pytest.mark.parametrize("method", [dict(method="flap", width={"ratio": 0.25}),
                                    dict(method="layers", depth={"remove": 1})])
def test_structured_pruning_of_a_model_held_in_bfloat16_loaded_and_streamed(tmp_path, tokenizer, texts, method):
    # the blocks' position embeddings were captured in float32: a bfloat16 block rotated its queries and keys in
    # float32, and attention refused them beside its bfloat16 values
    folder = tmp_path / "input"
    tiny_model("qwen3", layers=3).save_pretrained(folder, max_shard_size="100KB")
    tokenizer.save_pretrained(folder)
    options = dict(model_dtype="bfloat16", speed=False, **method)
    whole = run(folder, texts, tmp_path / "whole", **options)
    streamed = run(folder, texts, tmp_path / "streamed", max_memory=TINY_BUDGET / 2, **options)
    assert "streamed" in streamed["model"] and "streamed" not in whole["model"]
    expected, got = state(tmp_path / "whole"), state(tmp_path / "streamed")
    assert {t.dtype for t in got.values()} == {t.dtype for t in expected.values()} == {torch.bfloat16}
    assert {k: t.shape for k, t in got.items()} == {k: t.shape for k, t in expected.items()}
    for k in expected:  # the depth compensation's scale is folded into stored float32 weights when streamed, into
        # weights already rounded to bfloat16 when loaded: one rounding apart
        torch.testing.assert_close(got[k], expected[k], rtol=2 ** -7, atol=0)
    assert sum(t.numel() for t in got.values()) < sum(t.numel() for t in state(folder).values())
