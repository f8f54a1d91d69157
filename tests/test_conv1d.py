"""GPT-2's Conv1D layers (weights stored [in, out]): held as linears for the work, stored as Conv1D wherever the
model leaves prunelab (saved, streamed out, handed back by the API)."""

import pytest
import torch
from safetensors.torch import load_file
from test_streaming import TINY_BUDGET, run, state
from tiny import random_ids, tiny_model
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

import prunelab
from prunelab.errors import PrunelabError
from prunelab.models.adapters import find_adapter
from prunelab.models.conv1d import HeldConv1D, hold, release, released


def conv1d_weights(model) -> dict[str, torch.Tensor]:
    return {name: m.weight for name, m in model.named_modules() if isinstance(m, Conv1D)}


def gpt2_dir(tmp_path, tokenizer, layers: int = 2):
    folder = tmp_path / "tiny-gpt2"
    model = tiny_model("gpt2", layers=layers)
    with released(model):  # as GPT-2's checkpoints store it
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_holding_and_releasing_computes_the_same_and_keeps_the_weights():
    model = tiny_model("gpt2")
    release(model)  # as transformers builds it
    with pytest.raises(PrunelabError, match="its Conv1D layers are held as linears by prunelab.prune"):
        find_adapter(model)
    stored = {name: w.detach().clone() for name, w in conv1d_weights(model).items()}
    pointers = {name: w.data_ptr() for name, w in conv1d_weights(model).items()}
    ids = random_ids(2, 16)
    with torch.no_grad():
        expected = model(ids).logits
        assert hold(model) == 8 and not conv1d_weights(model)  # c_attn, c_proj, c_fc, c_proj in each of 2 blocks
        torch.testing.assert_close(model(ids).logits, expected)
    held = {name: m for name, m in model.named_modules() if isinstance(m, HeldConv1D)}
    assert all(torch.equal(m.weight, stored[name].t()) for name, m in held.items())
    assert {name: m.weight.data_ptr() for name, m in held.items()} == pointers  # views: holding copies nothing
    with released(model):
        assert {n: w.shape for n, w in conv1d_weights(model).items()} == {n: w.shape for n, w in stored.items()}
        assert all(torch.equal(w, stored[name]) for name, w in conv1d_weights(model).items())
    assert all(model.get_submodule(name) is m for name, m in held.items())  # the very modules, weights and all
    assert release(model) == 8 and all(torch.equal(w, stored[n]) for n, w in conv1d_weights(model).items())
    assert {name: w.data_ptr() for name, w in conv1d_weights(model).items()} == pointers


@pytest.mark.parametrize("reconstruct, retrain", [("attn-mlp", "none"), ("none", "masklora")])
def test_a_gpt2_checkpoint_is_pruned_and_saved_as_gpt2_stores_it(tmp_path, tokenizer, texts, monkeypatch,
                                                                  reconstruct, retrain):
    """2:4 groups run along each output's inputs: the stored [in, out] weight's columns. A square c_proj saved
    in the held layout would reload without complaint, and wrong."""
    import prunelab.job

    kept = {}
    real_save = prunelab.job.save
    monkeypatch.setattr(prunelab.job, "save", lambda model, *a, **k: real_save(kept.setdefault("m", model), *a, **k))
    folder, out = gpt2_dir(tmp_path, tokenizer), tmp_path / "pruned"
    retraining = {"method": retrain, "tokens": 8 * 32, "heldout": 2, "batch_size": 2, "lr": 1e-3}
    report = run(folder, texts, out, method="wanda", pattern="2:4", reconstruct={"granularity": reconstruct,
                 "lr": 1e-3, "heldout": 2}, retrain=retraining)
    before, after = load_file(folder / "model.safetensors"), state(out)
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    weights = conv1d_weights(reloaded)
    assert len(weights) == 8
    for name, w in weights.items():
        zeros = (w.t() == 0).reshape(w.shape[1], -1, 4).sum(-1)  # groups of 4 inputs of each output
        assert bool((zeros >= 2).all()), name
    assert report["sparsity"]["sparsity"] == pytest.approx(0.5)
    ids = random_ids(2, 24)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, kept["m"](ids).logits)
    if reconstruct != "none":
        losses = [(s["loss_train_before"], s["loss_train_after"]) for s in report["reconstruction"]["submodels"]]
        assert len(losses) == 4 and all(after < before for before, after in losses), losses


def test_a_streamed_gpt2_writes_what_the_model_loaded_whole_writes(tmp_path, tokenizer, texts):
    folder = gpt2_dir(tmp_path, tokenizer, layers=4)
    kwargs = dict(method="sparsegpt", reconstruct={"lr": 1e-3, "heldout": 4}, eval_dense=False)
    whole = run(folder, texts, tmp_path / "whole", **kwargs)
    streamed = run(folder, texts, tmp_path / "streamed", max_memory=TINY_BUDGET, **kwargs)
    assert "streamed" not in whole["model"] and streamed["model"]["streamed"]["shards"] == 5
    expected, got = state(tmp_path / "whole"), state(tmp_path / "streamed")
    assert expected.keys() == got.keys() and all(expected[k].equal(got[k]) for k in expected)
    assert got["transformer.h.0.mlp.c_fc.weight"].shape == (64, 256)  # [in, out], as GPT-2 stores it


def test_the_api_hands_a_gpt2_back_as_its_class_builds_it():
    model = tiny_model("gpt2")
    release(model)
    prunelab.prune(model, calibration=random_ids(8, 16), method="wanda", sparsity=0.5, reconstruct="none",
                   progress=False)
    weights = conv1d_weights(model)
    assert len(weights) == 8 and not any(isinstance(m, HeldConv1D) for m in model.modules())
    for name, w in weights.items():  # Wanda: half of each output's inputs, so half of each stored column
        assert ((w == 0).sum(0) == w.shape[0] // 2).all(), name
