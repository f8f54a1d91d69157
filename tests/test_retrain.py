"""Retraining baselines: full retraining and MaskLoRA keep the pruning mask exactly, lower the held-out
loss, save a plain checkpoint; bad settings fail before any work."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from tiny import as_loaded_in_bfloat16, tiny_model
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import prunelab
from prunelab.cli import app
from prunelab.errors import PrunelabError
from prunelab.models.adapters import find_adapter
from prunelab.recover.retrain import MaskLoRA

runner = CliRunner()


def job(tiny_dir, texts, out, retrain, **overrides):
    calib, evaluation = texts
    values = dict(model=str(tiny_dir), calib=str(calib), eval=str(evaluation), samples=8, seqlen=32,
                  eval_seqlen=32, eval_windows=4, forward_batch=4, out=str(out), reconstruct="none",
                  retrain={"tokens": 24 * 32, "heldout": 2, "batch_size": 2, "accumulate": 2, "evals": 2,
                           **retrain})
    values.update(overrides)
    return prunelab.run(values, progress=False)


def saved_zeros(folder) -> dict[str, int]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: int((f.get_tensor(k) == 0).sum()) for k in f.keys()}


@pytest.mark.parametrize("method", ["full", "masklora"])
@pytest.mark.parametrize("target", [{"sparsity": 0.5}, {"pattern": "2:4"}])
def test_retraining_keeps_the_mask_exactly_and_lowers_the_heldout_loss(method, target, tiny_dir, texts, tmp_path):
    pruned = job(tiny_dir, texts, tmp_path / "pruned", {"method": "none"}, **target)
    report = job(tiny_dir, texts, tmp_path / method, {"method": method, "lr": 3e-3}, **target)
    rt = report["retraining"]
    assert rt["heldout_loss_after"] < rt["heldout_loss_before"]
    assert rt["steps"] == 6 and rt["tokens_seen"] == 24 * 32 and rt["mask_kept"]
    assert len(rt["curve"]["train"]) == 6 and len(rt["curve"]["heldout"]) == 3  # before + `evals`
    # the saved files: a plain checkpoint (no adapter tensors) with exactly the pruned zeros
    before, after = saved_zeros(tmp_path / "pruned"), saved_zeros(tmp_path / method)
    assert set(after) == set(before) and not any("lora" in k for k in after)
    for name in report["sparsity"]["layers"]:
        assert after[name] == before[name] > 0
    assert report["sparsity"]["sparsity"] == pruned["sparsity"]["sparsity"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / method)
    weights = find_adapter(reloaded).prunable_weights()
    if "pattern" in target:  # 2 of every 4 consecutive weights of a row are zero
        for w in weights.values():
            assert ((w.view(w.shape[0], -1, 4) == 0).sum(-1) == 2).all()
    assert report["metrics"]["pruned"]["perplexity"] != pruned["metrics"]["pruned"]["perplexity"]
    assert "## Retraining" in (tmp_path / method / "REPORT.md").read_text()
    assert (tmp_path / method / "retraining_loss.png").is_file()


@pytest.mark.filterwarnings("error::FutureWarning")  # peft's use of a deprecated transformers name stays quiet
def test_masklora_forward_and_merge_are_the_masked_update():
    model = tiny_model("llama")
    adapter = find_adapter(model)
    weights = adapter.prunable_weights()
    for w in weights.values():
        w.masked_fill_(torch.rand_like(w) < 0.5, 0)
    zeros = {n: int((w == 0).sum()) for n, w in weights.items()}
    names = [n.removesuffix(".weight") for n in weights]
    lora = MaskLoRA(model, names, rank=4, alpha=8)
    layer = lora.peft.get_submodule("base_model.model.model." + names[0])  # (PEFT is shown the module tree only)
    torch.nn.init.normal_(layer.lora_B["default"].weight)  # B starts at zero; make the update non-zero
    base = layer.get_base_layer().weight.detach().clone()
    mask = base != 0
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * (8 / 4)
    x = torch.randn(3, base.shape[1])
    torch.testing.assert_close(layer(x), F.linear(x, base + mask * delta))
    ids = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        unmerged = lora.peft(input_ids=ids).logits
        merged_model = lora.merge()
        merged = merged_model(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    merged_weight = dict(merged_model.named_parameters())[names[0] + ".weight"]
    assert not torch.equal(merged_weight, base)  # the update went in ...
    for name, w in find_adapter(merged_model).prunable_weights().items():
        assert int((w == 0).sum()) == zeros[name]  # ... and only where the weights were not pruned


def test_masklora_adapts_exactly_the_pruned_linears_of_a_mixture_of_experts_model():
    """PEFT, shown a transformers model of a MoE family it converts (DeepSeek-V3 here; GLM-4-MoE, ERNIE 4.5 MoE,
    ...), turned the targets named gate_proj/up_proj/down_proj (block 0's dense MLP, the shared experts) into plain
    LoRA on the fused experts: the merge filled their pruned zeros, and those linears had no adapter. Shown the
    module tree only, it adapts the pruned linears and nothing else, and every zero stays."""
    model = tiny_model("deepseek_v3")
    weights = find_adapter(model).prunable_weights()
    for w in weights.values():
        w.masked_fill_(torch.rand_like(w) < 0.5, 0)
    zeros = {n: int((w == 0).sum()) for n, w in weights.items()}
    names = [n.removesuffix(".weight") for n in weights if n.endswith(".weight")]
    assert any(".shared_experts." in n for n in names) and any(n.endswith("layers.0.mlp.gate_proj") for n in names)
    lora = MaskLoRA(model, names, rank=4, alpha=8)
    adapted = {n.removeprefix("base_model.model.model.") for n, m in lora.peft.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(names)
    for m in lora.peft.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B["default"].weight)  # B starts at zero; make every update non-zero
    merged = lora.merge()
    assert merged is model
    for name, w in find_adapter(merged).prunable_weights().items():
        assert int((w == 0).sum()) == zeros[name], name

@pytest.mark.parametrize("overrides, message", [
    ({"retrain": {"method": "full", "tokens": 100}}, "less than one optimiser step"),
    ({"retrain": {"method": "masklora"}, "sparsity": 0.0}, "zeroes no weights"),
    ({"retrain": {"method": "masklora"}, "method": "flap"}, "zeroes no weights"),
    ({"retrain": {"method": "lora"}}, "retrain.method must be one of none, full, masklora"),
    ({"retrain": {"method": "full", "checkpointing": "false"}}, "retrain.checkpointing must be true or false"),
    ({"retrain": {"method": "full", "lr": -1.0}}, "learning rates must be positive"),
])
def test_bad_retraining_settings_fail_before_any_work(overrides, message, tiny_dir, texts, tmp_path):
    calib, evaluation = texts
    values = dict(model=str(tiny_dir), calib=str(calib), eval=str(evaluation), out=str(tmp_path / "out"))
    with pytest.raises(PrunelabError, match=message):
        prunelab.run({**values, **overrides}, progress=False)
    assert not (tmp_path / "out").exists()


def test_retraining_on_the_evaluation_text_is_refused(tiny_dir, texts, tmp_path):
    calib, _ = texts
    result = runner.invoke(app, ["run", "--model", str(tiny_dir), "--calib", str(calib), "--eval", str(calib),
                                 "--retrain", "full", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "disjoint" in result.output
    assert not (tmp_path / "out").exists()


def test_masklora_after_reconstruction_from_the_cli_and_config_shorthand(tiny_dir, texts, tmp_path):
    calib, evaluation = texts
    result = runner.invoke(app, [
        "run", "--model", str(tiny_dir), "--calib", str(calib), "--eval", str(evaluation), "--samples", "8",
        "--seqlen", "32", "--eval-seqlen", "32", "--eval-windows", "4", "--reconstruct", "attn-mlp", "--heldout", "2",
        "--lr", "1e-3", "--retrain", "masklora", "--retrain-tokens", "512", "--retrain-batch", "2",
        "--retrain-accumulate", "1", "--retrain-lr", "1e-3", "--lora-rank", "4", "--retrain-heldout", "2",
        "--out", str(tmp_path / "both")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "both" / "prunelab.json").read_text())
    assert report["reconstruction"] is not None and report["retraining"]["rank"] == 4
    assert report["retraining"]["steps"] == 8 and report["config"]["retrain"]["method"] == "masklora"
    assert set(report["stages"]) >= {"prune+reconstruct", "retrain", "save"}
    again = prunelab.config.RunConfig.from_dict({"retrain": "full"})
    assert again.retrain.method == "full" and again.needs_calibration


def test_api_prune_with_masklora_merges_into_the_same_model(tokenizer, texts):
    model = tiny_model("llama")
    calib, _ = texts
    settings = dict(sparsity=0.5, reconstruct="none", samples=4, seqlen=32, progress=False,
                    retrain={"method": "masklora", "tokens": 256, "batch_size": 2, "accumulate": 1, "heldout": 2,
                             "lr": 1e-3})
    with pytest.raises(PrunelabError, match="pass a tokenizer"):
        prunelab.prune(model, None, calibration=str(calib), **settings)
    result = prunelab.prune(model, tokenizer, calibration=str(calib), **settings)
    assert result["retraining"]["steps"] == 4 and result["retraining"]["heldout_loss_after"] < result[
        "retraining"]["heldout_loss_before"]
    assert not any("lora" in name for name, _ in model.named_parameters())
    for w in find_adapter(model).prunable_weights().values():
        assert (w == 0).float().mean() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("method", ["full", "masklora"])
def test_a_bfloat16_model_is_reconstructed_and_retrained_in_float32_and_keeps_its_dtypes(method, tokenizer, texts):
    # reconstruction gives the parameters of a model held in bfloat16 new (float32, then bfloat16) tensors: the
    # sparsity was read from the old ones (0.0), and MaskLoRA found no pruned weight in them
    model = as_loaded_in_bfloat16(tiny_model("deepseek_v3"))  # its router stays float32, and must
    held = {n: t.dtype for n, t in model.state_dict().items()}
    calib, _ = texts
    result = prunelab.prune(model, tokenizer, calibration=str(calib), sparsity=0.5, samples=4, seqlen=32,
                            progress=False, reconstruct={"heldout": 2, "lr": 1e-3},
                            retrain={"method": method, "tokens": 256, "batch_size": 2, "accumulate": 1, "heldout": 2,
                                     "lr": 1e-3})
    assert result["sparsity"]["sparsity"] == 0.5
    rt = result["retraining"]
    assert rt["mask_kept"] and rt["heldout_loss_after"] < rt["heldout_loss_before"]
    assert {n: t.dtype for n, t in model.state_dict().items()} == held
    for w in find_adapter(model).prunable_weights().values():
        assert (w == 0).float().mean() == 0.5


def test_a_retraining_that_moved_the_mask_is_refused_through_the_api_too(tokenizer, texts, monkeypatch):
    """The check that no pruned weight moved lives in `retrain`, so the API refuses a broken mask as the job does
    (it once handed back PEFT's unmasked merge of a MoE family's experts without a word)."""
    real = MaskLoRA.merge

    def filling(self):  # a library that does not do what it was asked: the merge fills one layer's zeros
        model = real(self)
        with torch.no_grad():
            weight = next(iter(find_adapter(model).prunable_weights().values()))
            weight.masked_fill_(weight == 0, 1e-3)
        return model

    monkeypatch.setattr(MaskLoRA, "merge", filling)
    calib, _ = texts
    with pytest.raises(PrunelabError, match="retraining changed the pruning mask of model.layers.0.self_attn.q_proj"):
        prunelab.prune(tiny_model("llama"), tokenizer, calibration=str(calib), sparsity=0.5, reconstruct="none",
                       samples=4, seqlen=32, progress=False, retrain={"method": "masklora", "tokens": 256,
                                                                      "batch_size": 2, "accumulate": 1, "heldout": 2,
                                                                      "lr": 1e-3})

def test_masked_low_rank_gradients_equal_autograd_of_the_plain_expression():
    from prunelab.recover.retrain import MaskedLowRank

    torch.manual_seed(0)
    weight = torch.randn(6, 8)
    pruned = torch.rand(6, 8) < 0.5
    weight[pruned] = 0
    x = torch.randn(2, 3, 8, requires_grad=True)
    a, b = torch.randn(2, 8, requires_grad=True), torch.randn(6, 2, requires_grad=True)
    target = torch.randn(2, 3, 6)
    (MaskedLowRank.apply(x, weight, pruned, a, b, 1.5) - target).pow(2).sum().backward()
    ours = [t.grad.clone() for t in (x, a, b)]
    for t in (x, a, b):
        t.grad = None
    (F.linear(x, weight + 1.5 * (~pruned) * (b @ a)) - target).pow(2).sum().backward()
    for mine, reference in zip(ours, (x.grad, a.grad, b.grad)):
        torch.testing.assert_close(mine, reference)


# transformers 5.2x deprecates gradient_checkpointing_enable for activation_checkpointing_enable: use the new name
@pytest.mark.filterwarnings("error::FutureWarning")
def test_gradient_checkpointing_gives_the_same_training_and_bfloat16_keeps_the_mask():
    import copy

    from prunelab.config import RunConfig
    from prunelab.recover import retrain

    base = tiny_model("llama")
    ids = torch.randint(0, 200, (8, 32), generator=torch.Generator().manual_seed(0))
    held = torch.randint(0, 200, (2, 32), generator=torch.Generator().manual_seed(1))
    prunelab.prune(base, calibration=ids, sparsity=0.5, reconstruct="none", progress=False)
    records = {}
    for name, extra in (("plain", {}), ("checkpointing", {"checkpointing": True}),
                        ("bfloat16", {"precision": "bfloat16"})):
        model = copy.deepcopy(base)
        cfg = RunConfig(seqlen=32, reconstruct="none", retrain={"method": "full", "tokens": 256, "lr": 1e-3,
                                                                "batch_size": 2, "accumulate": 2, "heldout": 2,
                                                                **extra})
        model, records[name] = retrain(model, find_adapter(model).prunable_weights(), cfg, ids, held, progress=False)
        for w in find_adapter(model).prunable_weights().values():
            assert (w == 0).float().mean() == pytest.approx(0.5, abs=0.01)
    assert records["checkpointing"]["checkpointing"] and not records["plain"]["checkpointing"]
    assert records["checkpointing"]["heldout_loss_after"] == pytest.approx(records["plain"]["heldout_loss_after"],
                                                                          rel=1e-5)
    assert records["bfloat16"]["precision"] == "bfloat16" and records["plain"]["precision"] == "float32"
    assert records["bfloat16"]["heldout_loss_after"] < records["bfloat16"]["heldout_loss_before"]


def test_auto_lr_follows_a_best_rate_at_the_grids_edge(tiny_dir, texts, tmp_path):
    report = job(tiny_dir, texts, tmp_path / "auto", {"method": "full", "lr": "auto", "lr_grid": [1e-6, 3e-6]})
    lr = report["retraining"]["lr"]
    # on a random tiny model larger rates learn faster: the edge is followed twice, each a factor of 3
    assert lr["grid"] == pytest.approx([1e-6, 3e-6, 9e-6, 2.7e-5]) and lr["lr"] == pytest.approx(2.7e-5)
    assert len(lr["heldout_loss"]) == 4 and lr["probe_tokens"] == 4 * lr["probe_steps"] * 4 * 32
    assert lr["at_edge"] and "at its edge" in (tmp_path / "auto" / "REPORT.md").read_text()


def test_a_retraining_probe_that_diverges_loses_and_the_run_goes_on(tiny_dir, texts, tmp_path, monkeypatch):
    from prunelab.recover.loop import Diverged
    from prunelab.recover.retrain import Retraining

    train = Retraining.train

    def exploding(self, lr, steps, curve=None):  # with norms in every block a real blow-up is hard to force
        if lr > 1:
            raise Diverged("retraining loss became nan")
        return train(self, lr, steps, curve)

    monkeypatch.setattr(Retraining, "train", exploding)
    report = job(tiny_dir, texts, tmp_path / "auto", {"method": "full", "lr": "auto", "lr_grid": [1e-4, 10.0]})
    lr = report["retraining"]["lr"]
    assert lr["heldout_loss"]["10"] is None and lr["lr"] == pytest.approx(1e-4)
    json.dumps(report, allow_nan=False)  # the report stays strict JSON
    assert "10: diverged" in (tmp_path / "auto" / "REPORT.md").read_text()
    with pytest.raises(PrunelabError, match="retraining diverged at every lr of the grid"):
        job(tiny_dir, texts, tmp_path / "bad", {"method": "full", "lr": "auto", "lr_grid": [10.0, 30.0]})
    assert not (tmp_path / "bad").exists()  # nothing half-written
