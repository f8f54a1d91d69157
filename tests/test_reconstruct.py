"""Local reconstruction on tiny models: it learns, keeps the mask, covers the model once, and feeds
each submodel what its propagation mode says."""

import copy
import json

import pytest
import torch
from tiny import FAMILIES, as_loaded_in_bfloat16, random_ids, tiny_model
from torch import nn

import prunelab
from prunelab.activations import capture_block_inputs, run_halves
from prunelab.config import RunConfig
from prunelab.errors import PrunelabError
from prunelab.models.adapters import find_adapter
from prunelab.recover import Trainable, fit, schedule, submodels, token_loss
from prunelab.recover.loop import adamw, channel_scale, dense
from prunelab.recover.reconstruct import prune_and_reconstruct
from prunelab.recover.step import LearningRate, SubmodelProblem

TRAIN, HELD = random_ids(12, 16, seed=1), random_ids(4, 16, seed=2)


def reconstruct(model, observer=None, **options):
    # float32: on hardware with native bfloat16, `auto` would round these tiny models' small losses
    recon = {"lr": 5e-4, "epochs": 2, "heldout": 4, "precision": "float32", **options.pop("reconstruct", {})}
    config = RunConfig(method=options.pop("method", "wanda"), forward_batch=4, reconstruct=recon, **options)
    return prune_and_reconstruct(model, find_adapter(model), TRAIN, HELD, config, progress=False, observer=observer)


def zero_masks(model):
    return {name: w == 0 for name, w in find_adapter(model).prunable_weights().items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_attn_mlp_reconstruction_lowers_the_submodels_loss_and_keeps_the_sparsity(family):
    model = tiny_model(family)
    parallel = find_adapter(model).halves(find_adapter(model).blocks[0])[0].deferred
    _, report = reconstruct(model)
    # two blocks, two halves each; a parallel block's halves are one submodel (nothing lies between them)
    halves = ["block 0 attention", "block 0 mlp", "block 1 attention", "block 1 mlp"]
    assert [r["submodel"] for r in report["submodels"]] == (["block 0", "block 1"] if parallel else halves)
    trained = [r for r in report["submodels"] if not r.get("kept_untrained")]
    assert len(trained) >= len(report["submodels"]) - 1, report["submodels"]  # a routed MLP may overfit 12 tiny
    # windows and be kept as pruned
    for record in trained:
        assert record["loss_train_after"] < record["loss_train_before"], record
        assert record["loss_heldout_after"] <= record["loss_heldout_before"], record
    adapter = find_adapter(model)
    for block in adapter.blocks:
        with adapter.prunable_linears(block) as linears:  # (an expert's view: its output rows, in any layout)
            for name, linear in linears.items():
                w = linear.weight
                # Wanda removes exactly half of every row; a weight revived by training would break this
                assert torch.equal((w == 0).sum(-1), torch.full((w.shape[0],), w.shape[1] // 2)), name


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_pruning_called_under_no_grad_reconstructs_and_retrains_as_it_does_outside(mode, tokenizer, texts):
    # a caller's evaluation code is often under torch.no_grad(): the reconstruction's loss had no gradient there
    ids = random_ids(24, 16)
    outside, inside = tiny_model("llama"), tiny_model("llama")
    inside.load_state_dict(outside.state_dict())
    retraining = {"method": "full", "tokens": 256, "batch_size": 2, "accumulate": 1, "heldout": 2, "lr": 1e-3}
    options = dict(calibration=ids, progress=False, calib=str(texts[0]), seqlen=16, retrain=retraining)
    prunelab.prune(outside, tokenizer, **options)
    with mode():
        got = prunelab.prune(inside, tokenizer, **options)
    first = got["reconstruction"]["submodels"][0]
    assert first["loss_heldout_after"] < first["loss_heldout_before"] and got["retraining"]["steps"] > 0
    assert all(torch.equal(a, b) for a, b in zip(outside.state_dict().values(), inside.state_dict().values()))
    with torch.inference_mode():
        loaded_inside = tiny_model("llama")
    with pytest.raises(PrunelabError, match=r"loaded under torch.inference_mode\(\), and its weights cannot be "):
        prunelab.prune(loaded_inside, calibration=ids, progress=False)


def test_a_model_in_train_mode_is_pruned_without_its_dropout_and_keeps_its_modes():
    ids = random_ids(24, 16)
    evaluating, training = tiny_model("llama", attention_dropout=0.5), tiny_model("llama", attention_dropout=0.5)
    training.load_state_dict(evaluating.state_dict())
    training.train()
    training.model.layers[1].eval()  # a caller's own mix of modes
    prunelab.prune(evaluating.eval(), calibration=ids, progress=False)
    prunelab.prune(training, calibration=ids, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(evaluating.state_dict().values(), training.state_dict().values()))
    assert training.training and training.model.layers[0].training and not training.model.layers[1].training
    assert not evaluating.training


def test_pruned_weights_stay_exactly_zero_after_every_optimiser_step():
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    with torch.no_grad():
        linear.weight[:, ::2] = 0
    pruned = linear.weight == 0
    x, y = torch.randn(6, 5, 16), torch.randn(6, 5, 8)

    class Problem:
        scale = None

        def windows(self, split):
            return 6

        def batch(self, split, windows):
            return linear(x[windows]), y[windows], None

    trainable = Trainable.of(list(linear.parameters()), {id(linear.weight)})
    checks = []
    fit(trainable, Problem(), lr=0.1, loss="mse", epochs=3, batch_size=2, warmup=0.1, weight_decay=0.1, seed=0,
        on_step=lambda: checks.append(torch.equal(linear.weight == 0, pruned)))
    assert len(checks) == 9 and all(checks)
    assert trainable.count() == linear.weight.numel() // 2 + linear.bias.numel()


@pytest.mark.parametrize("view", ["transposed", "transposed rows", "every other row"])
def test_adamw_steps_a_strided_parameter_like_a_contiguous_one(view):
    # GPT-2's held Conv1D weights are transposes; Llama 4's and GPT-OSS's expert views slices of transposes
    base = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(0))
    stored = base.clone()
    held = {"transposed": lambda t: t[0].T, "transposed rows": lambda t: t[0].T[:4],
            "every other row": lambda t: t[1].T[0::2]}[view]
    strided, plain = nn.Parameter(held(base)), nn.Parameter(held(stored).contiguous())
    assert not strided.is_contiguous() and plain.is_contiguous()
    assert dense(strided) == (view == "transposed") and dense(plain)
    x = torch.randn(5, plain.shape[1], generator=torch.Generator().manual_seed(1))
    for param in (strided, plain):
        optimizer = adamw([param], lr=1e-2, weight_decay=0.01)
        for _ in range(3):
            optimizer.zero_grad()
            (x @ param.T).pow(2).sum().backward()  # gradients with the strides autograd gives them
            optimizer.step()
    torch.testing.assert_close(strided.detach(), plain.detach(), rtol=1e-5, atol=1e-6)
    held(stored).copy_(plain.detach())
    torch.testing.assert_close(base, stored, rtol=1e-5, atol=1e-6)  # and nothing outside the view moved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_spilled_snapshot_restores_bit_for_bit(dtype):
    linear = torch.nn.Linear(16, 8).to(dtype)
    with torch.no_grad():
        linear.weight[:, ::2] = 0
    trainable = Trainable.of(list(linear.parameters()), {id(linear.weight)})
    before = [p.detach().clone() for p in linear.parameters()]
    in_memory, spilled = trainable.snapshot(), trainable.snapshot(spill=True)
    assert [type(s).__name__ for s in spilled] == ["Spilled", "Spilled"]
    for state in (spilled, in_memory):
        with torch.no_grad():
            for p in linear.parameters():
                p.add_(1.0)
        trainable.restore(state)
        assert all(torch.equal(p, b) for p, b in zip(linear.parameters(), before))
    assert spilled[0].load().numel() == linear.weight.numel() // 2  # only the surviving entries


def test_saved_model_has_exactly_the_mask_pruning_chose(tiny_dir, texts, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from prunelab.prune.sequential import HalfPruner

    chosen = {}
    real = HalfPruner.prune_group

    def record_masks(self, index, linears, names, stats, mirrors=None, **kwargs):
        order = real(self, index, linears, names, stats, mirrors, **kwargs)
        for name in names:
            chosen[f"model.layers.{index}.{name}.weight"] = linears[name].weight == 0
        return order

    monkeypatch.setattr(HalfPruner, "prune_group", record_masks)
    out = tmp_path / "out"
    report = prunelab.run(model=str(tiny_dir), calib=str(texts[0]), eval=str(texts[1]), samples=8, seqlen=16,
                          eval_windows=2, eval_seqlen=16, out=str(out), pattern="2:4",
                          reconstruct={"lr": 1e-3, "heldout": 2}, progress=False)
    saved = load_file(out / "model.safetensors")
    assert len(chosen) == 14
    for name, mask in chosen.items():
        assert torch.equal(saved[name] == 0, mask), name
    assert all(r["loss_train_after"] < r["loss_train_before"] for r in report["reconstruction"]["submodels"])
    written = json.loads((out / "prunelab.json").read_text())
    assert written["reconstruction"]["submodels"][0]["lr"] == 1e-3
    assert "## Reconstruction" in (out / "REPORT.md").read_text()


@pytest.mark.parametrize(
    "granularity, count", [("attn-mlp", 4), ("block", 2), ("blocks:2", 1), ("blocks:4", 1), ("model", 1)]
)
def test_granularities_cover_every_half_once_and_train_every_parameter_once(granularity, count):
    plan = submodels(2, RunConfig(reconstruct=granularity))
    assert len(plan) == count and [u for units in plan for u in units] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    model = tiny_model("llama")
    adapter = find_adapter(model)
    for block in adapter.blocks:  # the two halves partition each block's parameters
        attention, mlp = adapter.halves(block)
        ids_a, ids_m = {id(p) for p in attention.parameters()}, {id(p) for p in mlp.parameters()}
        assert not ids_a & ids_m and ids_a | ids_m == {id(p) for p in block.parameters()}


def test_a_parallel_blocks_halves_are_one_submodel_and_both_branches_train():
    parallel = {1}  # attention and MLP side by side: nothing lies between them to match
    assert submodels(3, RunConfig(reconstruct="attn-mlp"), parallel) == [
        [(0, 0)], [(0, 1)], [(1, 0), (1, 1)], [(2, 0)], [(2, 1)]]
    assert submodels(3, RunConfig(reconstruct="matrix"), parallel) == [[(i, p)] for i in range(3) for p in (0, 1)]
    assert submodels(3, RunConfig(reconstruct="block"), parallel) == [[(i, 0), (i, 1)] for i in range(3)]
    pruned = tiny_model("phi")
    reconstruct(pruned, reconstruct={"granularity": "none"})
    model = tiny_model("phi")
    _, report = reconstruct(model)
    assert [r["submodel"] for r in report["submodels"]] == ["block 0", "block 1"]
    trained, only_pruned = find_adapter(model).blocks[0], find_adapter(pruned).blocks[0]
    for name in ("self_attn.q_proj", "self_attn.dense", "mlp.fc1", "mlp.fc2"):  # both branches moved, masks kept
        w, w0 = trained.get_submodule(name).weight, only_pruned.get_submodule(name).weight
        assert torch.equal(w == 0, w0 == 0) and not torch.equal(w, w0), name
    assert not torch.equal(trained.input_layernorm.weight, only_pruned.input_layernorm.weight)  # the shared norm


def test_model_granularity_trains_the_sum_of_the_parts():
    counts = {}
    for granularity in ("attn-mlp", "block", "model"):
        model = tiny_model("llama")
        _, report = reconstruct(model, reconstruct={"granularity": granularity})
        counts[granularity] = sum(r["trainable"] for r in report["submodels"])
    blocks = find_adapter(model).blocks
    total = sum(p.numel() for p in blocks.parameters())
    pruned = sum(int((w == 0).sum()) for w in find_adapter(model).prunable_weights().values())
    assert counts["attn-mlp"] == counts["block"] == counts["model"] == total - pruned


def test_matrix_granularity_trains_each_linear_alone_once():
    model = tiny_model("llama")
    _, report = reconstruct(model, reconstruct={"granularity": "matrix"})
    layers = [(r["blocks"][0], m["layer"]) for r in report["submodels"] for m in r["matrices"]]
    expected = [
        (i, f"{part}.{n}")
        for i in range(2)
        for part, names in (
            ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
            ("mlp", ("gate_proj", "up_proj", "down_proj")),
        )
        for n in names
    ]
    assert sorted(layers) == sorted(expected) and len(layers) == len(set(layers))
    for r in report["submodels"]:
        assert all(m["loss_train_after"] < m["loss_train_before"] for m in r["matrices"])


def test_matrix_granularity_refuses_routed_experts():
    with pytest.raises(PrunelabError, match="matrix reconstruction needs linears that every token runs"):
        reconstruct(tiny_model("mixtral"), reconstruct={"granularity": "matrix"})


def dense_boundaries(model):
    """The dense model's activations before each half-block, for the training windows."""
    adapter = find_adapter(model)
    stream = capture_block_inputs(model, adapter.blocks, TRAIN, None, 4, torch.float32)
    out = [stream.hidden.clone()]
    for i, block in enumerate(adapter.blocks):
        for half in adapter.halves(block):
            out.append(run_halves([half], [i], stream.with_hidden(out[-1]), torch.empty_like(out[-1]), "half"))
    return out


@pytest.mark.parametrize("mode", ["dense", "sparse", "mixed"])
def test_propagation_modes_feed_what_the_spec_says(mode):
    model = tiny_model("llama")
    dense_model = copy.deepcopy(model)
    reference = dense_boundaries(dense_model)
    dense_adapter = find_adapter(dense_model)
    seen = []
    reconstruct(
        model,
        observer=lambda e: seen.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in e.items()}),
        reconstruct={"propagation": mode},
    )
    for k, event in enumerate(seen):
        ((i, part),) = event["units"]
        dense_half = dense_adapter.halves(dense_adapter.blocks[i])[part]
        stream = capture_block_inputs(dense_model, dense_adapter.blocks, TRAIN, None, 4, torch.float32)
        dense_of_input = run_halves(
            [dense_half], [i], stream.with_hidden(event["inputs"]), torch.empty_like(event["inputs"]), "dense half"
        )
        if mode == "dense":
            torch.testing.assert_close(event["inputs"], reference[k])
            torch.testing.assert_close(event["targets"], reference[k + 1])
        else:
            if k > 0:  # the previous submodel's (pruned, reconstructed) outputs
                torch.testing.assert_close(event["inputs"], seen[k - 1]["outputs"])
                assert not torch.allclose(event["inputs"], reference[k])
            wanted = dense_of_input if mode == "sparse" else reference[k + 1]
            torch.testing.assert_close(event["targets"], wanted)
    if mode == "sparse":  # the dense model's own activations would be a different target
        assert not torch.allclose(seen[-1]["targets"], reference[-1])


def test_lr_auto_tries_the_grid_and_reports_its_choice():
    model = tiny_model("llama")
    _, report = reconstruct(model, reconstruct={"lr": "auto", "lr_grid": [1e-7, 5e-4], "lr_probe": 2})
    lr = report["lr"]
    assert lr["mode"] == "auto" and lr["probed_problems"] == 2
    assert set(report["submodels"][0]["lr_probe"]) == {"1e-07", "0.0005"}
    assert all(r["lr"] == lr["lr"] for r in report["submodels"][2:])
    assert lr["lr"] == 5e-4  # 1e-7 barely moves the weights in 12 steps


def test_a_submodel_training_would_only_worsen_is_kept_as_it_was():
    model = tiny_model("llama")
    original = copy.deepcopy(model.state_dict())
    # Nothing pruned: every submodel starts at its target (loss 0); weight decay can only move it away.
    _, report = reconstruct(model, sparsity=0.0, reconstruct={"lr": 0.05, "weight_decay": 0.5})
    assert all(r["kept_untrained"] and r["loss_heldout_after"] == r["loss_heldout_before"] for r in report["submodels"])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def test_trained_submodels_are_not_flagged_untrained():
    _, report = reconstruct(tiny_model("llama"))
    assert not any(r.get("kept_untrained") for r in report["submodels"])


def test_offloaded_activations_give_the_same_result():
    models = [tiny_model("qwen2") for _ in range(2)]
    reports = [reconstruct(m, reconstruct={"offload": o})[1] for m, o in zip(models, ("off", "on"))]
    assert reports[1]["offload"] and not reports[0]["offload"]
    for a, b in zip(*(m.state_dict().values() for m in models)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_norms_leaves_every_norm_alone(freeze):
    model = tiny_model("gemma3")  # four norms per block, and q/k norms inside attention
    norms = {n: p.clone() for n, p in model.named_parameters() if "norm" in n and ".layers." in n}
    linears = {n: p.clone() for n, p in model.named_parameters() if "proj" in n}
    reconstruct(model, reconstruct={"freeze_norms": freeze})
    changed = {n for n, p in model.named_parameters() if n in norms and not torch.equal(norms[n], p)}
    assert changed == (set() if freeze else set(norms))
    assert all(not torch.equal(linears[n], p) for n, p in model.named_parameters() if n in linears)


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "gpt_oss", "deepseek_v3"])  # fused experts: trained
# through views; DeepSeek-V3 keeps its router in float32 when loaded in bfloat16, and must keep it
def test_bfloat16_model_trains_in_float32_and_each_weight_keeps_its_dtype(family):
    model = as_loaded_in_bfloat16(tiny_model(family))
    held = {n: t.dtype for n, t in model.state_dict().items()}  # the routers' correction biases are buffers
    assert family != "deepseek_v3" or torch.float32 in held.values()
    _, report = reconstruct(model, model_dtype="bfloat16")
    assert {n: t.dtype for n, t in model.state_dict().items()} == held
    trained = [r for r in report["submodels"] if not r.get("kept_untrained")]  # a routed MLP may be kept as pruned
    assert len(trained) >= 3 and all(r["loss_train_after"] < r["loss_train_before"] for r in trained)


def test_pad_tokens_do_not_count_in_the_loss():
    pred, target = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    changed = pred.clone()
    changed[0, 2:] += 100
    scale = torch.rand(8) + 0.5
    for loss in ("mse", "cmse", "nmse", "cosine"):
        assert token_loss(loss, pred, target, mask, scale) == token_loss(loss, changed, target, mask, scale)
        assert token_loss(loss, pred, target, None, scale) != token_loss(loss, changed, target, None, scale)


def test_cmse_weighs_each_channel_by_its_size_over_the_non_pad_tokens():
    torch.manual_seed(0)
    target = torch.randn(4, 6, 5)
    target[..., 0] *= 1000  # one massive channel, as in Gemma's and SmolLM2's residual streams
    target[..., 4] = 0  # and a dead one
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 3:] = False
    target[1, 3:] = 1e6  # pad tokens: their size must not count
    scale = channel_scale(target, lambda rows: mask[rows], chunk=3)
    kept = target[mask]
    assert torch.allclose(scale[:4], kept[:, :4].pow(2).mean(0).rsqrt(), rtol=1e-5)
    assert torch.isfinite(scale[4]) and scale[4] > 100 * scale[:4].max()  # floored, not infinite
    # an error of 1 % of each channel's size costs the same in every channel; under mse the massive one dominates
    pred = target.clone()
    pred[..., :4] += 0.01 * kept[:, :4].abs().mean(0)
    assert token_loss("mse", pred, target, mask) > 1e4 * token_loss("mse", pred[..., 1:], target[..., 1:], mask)
    per_channel = [token_loss("cmse", pred[..., c:c + 1], target[..., c:c + 1], mask, scale[c:c + 1]) for c in range(4)]
    assert max(per_channel) < 2 * min(per_channel)
    with pytest.raises(PrunelabError, match="needs the targets' channel scale"):
        token_loss("cmse", pred, target, mask)


@pytest.mark.parametrize("granularity", ["attn-mlp", "matrix"])
def test_cmse_reconstruction_lowers_its_loss_on_the_scale_it_trains_on(granularity):
    _, report = reconstruct(tiny_model("llama"), reconstruct={"loss": "cmse", "granularity": granularity})
    submodels = report["submodels"]
    assert len(submodels) == 4 and all(r["loss_train_after"] < r["loss_train_before"] for r in submodels)
    if granularity == "matrix":
        assert all(m["loss_train_after"] < m["loss_train_before"] for r in submodels for m in r["matrices"])


def test_schedule_warms_up_then_decays_to_zero():
    factor = schedule(10, 0.1)
    assert [round(factor(s), 3) for s in (0, 1, 5, 9)] == [1.0, 1.0, 0.556, 0.111]
    assert schedule(20, 0.1)(0) == 0.5 and factor(10) == 0.0


def test_exploding_learning_rate_gives_a_clear_error():
    with pytest.raises(PrunelabError, match="reconstruction loss became"):
        reconstruct(tiny_model("llama"), reconstruct={"lr": 1e12})


def test_a_probe_that_diverges_loses_and_the_run_goes_on():
    _, report = reconstruct(tiny_model("llama"), reconstruct={"lr": "auto", "lr_grid": [5e-4, 1e12], "lr_probe": 2})
    assert report["submodels"][0]["lr_probe"]["1e+12"] is None
    assert report["lr"]["heldout_loss_ratio_geomean"]["1e+12"] is None and report["lr"]["lr"] == 5e-4
    json.dumps(report, allow_nan=False)  # the report stays strict JSON
    with pytest.raises(PrunelabError, match="diverged at every lr of the grid"):
        reconstruct(tiny_model("llama"), reconstruct={"lr": "auto", "lr_grid": [1e12, 1e13]})


def test_lr_probe_drops_an_edge_that_loses_to_its_neighbour_by_more_than_a_tenth():
    policy = LearningRate(None, (1e-2, 1e-4, 3e-4, 1e-3, 3e-3), probe=4)
    # held-out losses after training (before: 1) of SmolLM2's first four halves, batch 1
    policy.tried(1.0, {1e-4: 0.152, 3e-4: 0.121, 1e-3: 0.101, 3e-3: 0.127, 1e-2: 0.559})
    assert policy.candidates() == (3e-4, 1e-3, 3e-3)  # both ends lost by > 10 %; 3e-3 is only an end now
    policy.tried(1.0, {3e-4: 0.541, 1e-3: 0.398, 3e-3: 0.292})
    assert policy.candidates() == (1e-3, 3e-3)
    policy.tried(1.0, {1e-3: 0.834, 3e-3: 0.811})
    assert policy.candidates() == (1e-3, 3e-3) and policy.chosen is None  # never fewer than two
    policy.tried(1.0, {1e-3: 0.759, 3e-3: 0.696})
    assert policy.candidates() == (3e-3,)
    summary = policy.summary()
    assert summary["dropped_after"] == {"0.0001": 1, "0.01": 1, "0.0003": 2} and summary["probed_problems"] == 4
    assert set(summary["heldout_loss_ratio_geomean"]) == {"0.001", "0.003"}  # those probed on every submodel
    close = LearningRate(None, (1e-3, 3e-3, 1e-2), probe=2)
    close.tried(1.0, {1e-3: 0.43, 3e-3: 0.4, 1e-2: 0.43})  # within 10 % of the neighbour: kept
    assert close.candidates() == (1e-3, 3e-3, 1e-2)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"granularity": "blocks:0"}, "reconstruct.granularity must be one of"),
        ({"granularity": "layers"}, "reconstruct.granularity must be one of"),
        ({"propagation": "both"}, "propagation must be one of"),
        ({"loss": "l1"}, "loss must be one of"),
        ({"lr": "fast"}, "lr must be a positive number or 'auto'"),
        ({"lr": -1.0}, "learning rates must be positive"),
        ({"epochs": 0}, "reconstruct.epochs must be a positive integer"),
    ],
)
def test_bad_reconstruction_options_are_refused(options, message):
    with pytest.raises(PrunelabError, match=message):
        RunConfig(reconstruct=options)


def test_reconstruction_refuses_low_precision_activations():
    with pytest.raises(PrunelabError, match="reconstruction keeps activations in float32"):
        RunConfig(dtype="bfloat16")
    assert RunConfig(dtype="bfloat16", reconstruct="none").dtype == "bfloat16"


def test_api_splits_heldout_windows_off_a_given_tensor():
    model = tiny_model("llama")
    result = prunelab.prune(
        model, calibration=random_ids(10, 16), forward_batch=4, reconstruct={"heldout": 3, "lr": 1e-3}, progress=False
    )
    assert result["reconstruction"]["submodels"][0]["loss_heldout_before"] > 0
    with pytest.raises(PrunelabError, match="leave none for training"):
        prunelab.prune(tiny_model("llama"), calibration=random_ids(3, 16), reconstruct={"heldout": 3}, progress=False)


def test_bfloat16_precision_runs_the_matmuls_in_bfloat16_and_keeps_the_rest_float32():
    model = tiny_model("llama")
    seen, dtypes = [], set()
    q_proj = find_adapter(model).blocks[0].self_attn.q_proj
    handle = q_proj.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    _, report = reconstruct(model, observer=seen.append, reconstruct={"precision": "bfloat16"})
    handle.remove()
    assert report["precision"] == "bfloat16" and dtypes == {torch.bfloat16}
    assert all(s[k].dtype == torch.float32 for s in seen for k in ("inputs", "targets", "outputs"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    for name, weight in find_adapter(model).prunable_weights().items():  # Wanda 50 %: half of every row, exactly
        assert torch.equal((weight == 0).sum(-1), torch.full((weight.shape[0],), weight.shape[1] // 2)), name
    _, report = reconstruct(tiny_model("llama"))
    assert report["precision"] == "float32"


def test_pruning_inside_autocast_solves_in_float32():
    from prunelab.criteria.stats import Hessian
    from prunelab.prune.sequential import HalfPruner

    torch.manual_seed(0)
    x, weight = torch.randn(512, 300), torch.randn(16, 300)  # > 128 columns: SparseGPT multiplies across blocks
    pruned = {}
    for bf16 in (False, True):
        linear = nn.Linear(300, 16, bias=False)
        linear.weight.data.copy_(weight)
        stats = Hessian(300, torch.device("cpu"))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            stats.add(x)
            HalfPruner(RunConfig(method="sparsegpt"), "model.layers").prune_group(0, {"l": linear}, ["l"], stats)
        pruned[bf16] = linear.weight.detach().clone()
    assert torch.equal(pruned[False], pruned[True])


def test_auto_precision_follows_the_hardware(monkeypatch):
    from prunelab.precision import uses_bfloat16

    cpu = torch.device("cpu")
    for native in (False, True):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda native=native: native, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda native=native: native, raising=False)
        assert uses_bfloat16("auto", cpu) is native
        assert uses_bfloat16("auto", cpu, auto_on_cpu=False) is False
        assert uses_bfloat16("bfloat16", cpu) and not uses_bfloat16("float32", cpu)


def test_autocast_sees_every_optimiser_step():
    # autocast's default weight cache would keep the first bfloat16 copy of a trainable weight for the
    # whole region: a reconstruction trains many steps inside one and must see each update
    from prunelab.precision import autocast

    linear, x = nn.Linear(8, 8), torch.randn(4, 8)
    linear.requires_grad_(True)
    with autocast(True, torch.device("cpu")):
        before = linear(x)
        with torch.no_grad():
            linear.weight.add_(1.0)
        assert not torch.equal(linear(x), before)


def test_routed_experts_that_no_token_reached_train_silently():
    """With 64 experts and 2 a token, a batch leaves experts without a gradient: their AdamW skips the step while
    the learning-rate schedule goes on, which is right, and PyTorch's schedulers warned about it every time."""
    import warnings

    model = tiny_model("mixtral", num_local_experts=64, num_experts_per_tok=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, report = reconstruct(model)
    assert not [str(w.message) for w in caught]
    assert any(r["loss_train_after"] < r["loss_train_before"] for r in report["submodels"] if "mlp" in r["submodel"])


def test_a_training_batch_may_hold_padded_and_unpadded_windows():
    # the model passes an attention mask to a capture batch with padding and None to one without; a training batch
    # drawing windows from both could not stack them (TypeError), so it runs them in groups
    model = tiny_model("llama")
    ids, mask = random_ids(4, 16), torch.ones(4, 16, dtype=torch.long)
    mask[0, :5] = 0  # capture batches of 2: [0, 1] padded, [2, 3] not
    adapter = find_adapter(model)
    stream = capture_block_inputs(model, adapter.blocks, ids, mask, 2, torch.float32)
    kwargs = stream.block_kwargs[0]
    assert kwargs[0]["attention_mask"] is not None and kwargs[1]["attention_mask"] is None
    problem = SubmodelProblem(list(adapter.halves(adapter.blocks[0])), [0, 0], {"train": stream},
                              {"train": torch.arange(4.0).view(4, 1, 1).expand(4, 16, 64)})
    out, target, token_mask = problem.batch("train", torch.tensor([2, 0, 3]))
    alone = {w: problem.batch("train", torch.tensor([w]))[0] for w in (0, 2, 3)}
    order = target[:, 0, 0].long().tolist()  # which window each row is
    assert sorted(order) == [0, 2, 3]
    torch.testing.assert_close(out, torch.cat([alone[w] for w in order]))
    assert token_mask[order.index(0)].tolist() == [False] * 5 + [True] * 11 and token_mask.sum() == 3 * 16 - 5
    # and through a whole reconstruction with two windows a step
    mask = torch.ones(10, 16, dtype=torch.long)
    mask[0, :5] = 0
    result = prunelab.prune(tiny_model("llama"), calibration=random_ids(10, 16), attention_mask=mask, method="wanda",
                            forward_batch=4, progress=False,
                            reconstruct={"heldout": 2, "lr": 1e-3, "batch_size": 2, "precision": "float32"})
    records = result["reconstruction"]["submodels"]
    assert all(r["loss_train_after"] <= r["loss_train_before"] for r in records)
    assert sum(r["loss_train_after"] for r in records) < 0.9 * sum(r["loss_train_before"] for r in records)
