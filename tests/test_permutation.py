"""Channel permutation for N:M patterns (`permute`): the maths, the adapters' reorderable channels, and the pass."""

import copy

import pytest
import torch
from tiny import FAMILIES, random_ids, tiny_model
from transformers import AutoModelForCausalLM

import prunelab
from prunelab.activations import capture_block_inputs
from prunelab.config import RunConfig
from prunelab.criteria import Hessian, InputNorms
from prunelab.criteria.permutation import channel_permutation, retained
from prunelab.errors import PrunelabError
from prunelab.models.adapters import Channels, find_adapter
from prunelab.prune.permute import permuted_index, reorder
from prunelab.prune.sequential import HalfPruner


def test_a_pattern_that_keeps_the_best_channels_apart_keeps_them_all():
    # 2:4 over [10, 9, 8, 7 | 1, 1, 1, 1] drops 8 and 7; with one strong pair per group it keeps 10, 9, 8 and 7
    scores = torch.tensor([[10.0, 9, 8, 7, 1, 1, 1, 1]])
    order = channel_permutation(scores, 2, 4)
    assert sorted(order.tolist()) == list(range(8))
    assert retained(scores, 2, 4) == 21 and retained(scores[:, order], 2, 4) == 34


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_the_permutation_never_keeps_less_than_the_stored_order(n, m):
    g = torch.Generator().manual_seed(n * m)
    for _ in range(5):
        scores = torch.rand(24, 64, generator=g) * torch.rand(64, generator=g) ** 3  # uneven channels, as in LLMs
        order = channel_permutation(scores, n, m)
        assert sorted(order.tolist()) == list(range(64))
        assert retained(scores[:, order], n, m) > retained(scores, n, m)


def test_reordered_statistics_are_those_of_the_reordered_inputs():
    x = torch.randn(100, 12, generator=torch.Generator().manual_seed(0))
    order = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    for cls in (InputNorms, Hessian):
        stats, expected = cls(12, x.device), cls(12, x.device)
        stats.add(x)
        expected.add(x[:, order])
        stats.reorder(order)
        assert torch.allclose(stats.sq_norms, expected.sq_norms)
        if cls is Hessian:
            assert torch.allclose(stats.matrix, expected.matrix)


def random_reordering(channels: Channels, linears: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    pools, _, width = channels.columns.shape
    perms = torch.stack([torch.randperm(width, generator=g) for _ in range(pools)])
    orders = {channels.writer: (1, permuted_index(channels.columns, perms, linears[channels.writer].in_features))}
    orders.update({name: (0, permuted_index(rows, perms, linears[name].out_features))
                   for name, rows in channels.rows.items()})
    return orders


# Every family whose blocks have reorderable channels: dense MLPs (gated, fused gate_up, gateless, with biases,
# Conv1D held as linears) and separate q/k/v attention (grouped, with q/k norms, parallel blocks, OPT's).
@pytest.mark.parametrize("family, writers", [
    ("llama", {"self_attn.o_proj", "mlp.down_proj"}), ("qwen3", {"self_attn.o_proj", "mlp.down_proj"}),
    ("gemma3", {"self_attn.o_proj", "mlp.down_proj"}), ("olmo2", {"self_attn.o_proj", "mlp.down_proj"}),
    ("phi3", {"mlp.down_proj"}), ("starcoder2", {"self_attn.o_proj", "mlp.c_proj"}),
    ("gpt_neox", {"mlp.dense_4h_to_h"}), ("phi", {"self_attn.dense", "mlp.fc2"}), ("gpt2", {"mlp.c_proj"}),
    ("bloom", {"mlp.dense_4h_to_h"}), ("opt", {"self_attn.out_proj", "fc2"}), ("deepseek_v3", {"mlp.down_proj"}),
])
def test_reordering_an_adapters_channels_leaves_the_model_computing_the_same(family, writers):
    model = tiny_model(family)
    adapter = find_adapter(model)
    ids = random_ids(2, 16)
    with torch.no_grad():
        before = model(ids).logits
    block = adapter.blocks[0]
    channels = adapter.channels(block)
    assert set(channels) == writers
    with adapter.prunable_linears(block) as linears:
        for seed, found in enumerate(channels.values()):
            orders = random_reordering(found, linears, seed)
            assert not torch.equal(orders[found.writer][1], torch.arange(linears[found.writer].in_features))
            reorder(linears, orders)
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(after, before, atol=1e-5, rtol=1e-4)


EXPERTS = {f"experts.down_proj.{e}" for e in range(4)}


# Mixture-of-Experts blocks: every expert's hidden channels, through the views of the fused tensors (gate and up
# rows as halves, or interleaved: GPT-OSS), and the shared experts' (Qwen2-MoE, Qwen3-Next, Llama 4, DeepSeek-V3)
@pytest.mark.parametrize("family, attention, shared", [
    ("qwen2_moe", True, "shared_expert"), ("mixtral", True, None), ("qwen3_moe", True, None),
    ("llama4", True, "shared_expert"), ("gpt_oss", True, None), ("qwen3_next", False, "shared_expert"),
    ("deepseek_v3", False, "shared_experts"),
])
def test_reordering_every_experts_channels_leaves_the_model_computing_the_same(family, attention, shared):
    model = tiny_model(family)
    with torch.no_grad():  # GPT-OSS's expert biases start at zero: make the reordered biases count
        for name, p in model.named_parameters():
            if name.endswith("_bias"):
                p.normal_(0, 0.1)
    adapter = find_adapter(model)
    ids = random_ids(2, 16)
    with torch.no_grad():
        before = model(ids).logits
    block = adapter.blocks[-1]  # (the first blocks of Llama 4 and DeepSeek-V3 are dense)
    moe = adapter.halves(block)[1].modules[0]
    prefix = next(name for name, m in block.named_children() if m is moe)
    channels = adapter.channels(block)
    expected = {f"{prefix}.{name}" for name in EXPERTS | ({f"{shared}.down_proj"} if shared else set())}
    assert set(channels) == expected | ({"self_attn.o_proj"} if attention else set())
    fused = moe.experts.down_proj.detach().clone()
    with adapter.prunable_linears(block) as linears:
        for seed, found in enumerate(channels.values()):
            reorder(linears, random_reordering(found, linears, seed))
    assert not torch.equal(moe.experts.down_proj, fused)  # written through the views into the fused tensors
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(after, before, atol=1e-5, rtol=1e-4)


def test_the_gate_and_up_views_of_interleaved_experts_hold_the_gate_and_up_rows():
    # GPT-OSS's gate function reads gate rows at even and up rows at odd positions of gate_up ([E, H, 2I] stored)
    model = tiny_model("gpt_oss")
    adapter = find_adapter(model)
    block = adapter.blocks[0]
    gate_up = block.mlp.experts.gate_up_proj.detach().clone()
    with adapter.prunable_linears(block) as linears:
        assert block.mlp.experts.layout == "interleaved"
        assert torch.equal(linears["mlp.experts.gate_proj.1"].weight, gate_up[1].T[0::2])
        assert torch.equal(linears["mlp.experts.up_proj.1"].weight, gate_up[1].T[1::2])
    qwen = tiny_model("qwen3_moe")
    with find_adapter(qwen).prunable_linears(qwen.model.layers[0]):
        assert qwen.model.layers[0].mlp.experts.layout == "halves"


def test_attention_with_a_gate_in_its_query_rows_has_no_reorderable_values():
    # Qwen3-Next's full attention: q_proj also produces an output gate per value dimension; its experts have some
    model = tiny_model("qwen3_next")
    adapter = find_adapter(model)
    assert all(not any(".experts." not in n and "shared" not in n for n in adapter.channels(block))
               for block in adapter.blocks)


def test_a_model_with_nothing_to_reorder_is_pruned_without_and_says_so(monkeypatch):
    model = tiny_model("llama")
    monkeypatch.setattr(type(find_adapter(model)), "channels", lambda self, block: {})
    with pytest.warns(prunelab.errors.PrunelabWarning, match="no layer of this llama model has input channels"):
        report = prunelab.prune(model, calibration=random_ids(8, 32), method="wanda", pattern="2:4", permute=True,
                                reconstruct="none", progress=False)
    assert not any("permuted" in r for r in report["layers"]) and two_four_in_the_stored_layout(model)


def two_four_in_the_stored_layout(model) -> bool:
    weights = find_adapter(model).prunable_weights()
    return all(((w.reshape(-1, w.shape[-1] // 4, 4) != 0).sum(-1) <= 2).all() for w in weights.values())


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "ria"])
def test_permuted_pruning_keeps_more_of_the_score_and_stays_two_four(method):
    model = tiny_model("llama", intermediate_size=256)
    ids = random_ids(16, 32)
    report = prunelab.prune(model, calibration=ids, method=method, pattern="2:4", permute=True, reconstruct="none",
                            progress=False)
    permuted = {r["layer"]: r["permuted"] for r in report["layers"] if "permuted" in r}
    assert set(permuted) == {"self_attn.o_proj", "mlp.down_proj"} and len(report["layers"]) == 14
    assert all(p["kept_after"] > p["kept_before"] for p in permuted.values())
    assert two_four_in_the_stored_layout(model)
    assert report["sparsity"]["sparsity"] == pytest.approx(0.5)


def test_the_pruned_model_computes_what_the_same_masks_compute_in_the_stored_order():
    # Wanda's masks on a reordered down_proj are those of the reordered scores: undo the reordering, and the
    # model pruned with `permute` is the dense model with those masks, weights unchanged
    dense = tiny_model("llama", layers=1)
    model = copy.deepcopy(dense)
    ids = random_ids(16, 32)
    prunelab.prune(model, calibration=ids, method="wanda", pattern="2:4", permute=True, reconstruct="none",
                   progress=False)
    adapter = find_adapter(model)
    with torch.no_grad():
        x = adapter.blocks[0].mlp.down_proj.weight
        kept = x != 0
        assert kept.float().mean() == 0.5
        # every kept weight is one of the dense weights of its output row, moved with its column
        dense_rows = dense.model.layers[0].mlp.down_proj.weight
        assert all(set(x[r][kept[r]].tolist()) <= set(dense_rows[r].tolist()) for r in range(x.shape[0]))


def test_a_wrong_channel_map_is_caught_before_any_weight_is_pruned(monkeypatch):
    model = tiny_model("llama")
    adapter_cls = type(find_adapter(model))
    right = adapter_cls.channels

    def gate_forgotten(self, block):  # up_proj's rows move, gate_proj's stay: act(gate) · up no longer pairs up
        found = right(self, block)
        mlp = found["mlp.down_proj"]
        found["mlp.down_proj"] = Channels(mlp.writer, mlp.columns, {"mlp.up_proj": mlp.rows["mlp.up_proj"]})
        return found

    monkeypatch.setattr(adapter_cls, "channels", gate_forgotten)
    with pytest.raises(PrunelabError, match=r"permute: reordering the inputs of layer 0.mlp.down_proj changed what "
                                            r"it computes \(relative difference"):
        prunelab.prune(model, calibration=random_ids(8, 32), method="wanda", pattern="2:4", permute=True,
                       reconstruct="none", progress=False)


def test_a_wrong_expert_channel_map_is_caught_on_the_expert(monkeypatch):
    # the routed half runs its experts as routing decides: each reordering is checked on its expert alone
    model = tiny_model("qwen3_moe")
    adapter_cls = type(find_adapter(model))
    right = adapter_cls.channels

    def up_forgotten(self, block):
        found = right(self, block)
        down = found["mlp.experts.down_proj.2"]
        found[down.writer] = Channels(down.writer, down.columns, {"mlp.experts.gate_proj.2":
                                                                  down.rows["mlp.experts.gate_proj.2"]}, down.unit)
        return found

    monkeypatch.setattr(adapter_cls, "channels", up_forgotten)
    with pytest.raises(PrunelabError, match=r"layer 0.mlp.experts.down_proj.2 changed what it computes"):
        prunelab.prune(model, calibration=random_ids(8, 32), method="wanda", pattern="2:4", permute=True,
                       reconstruct="none", progress=False)


def two_four_views(model) -> bool:
    """2:4 along every prunable linear's inputs, fused experts through their per-expert views."""
    adapter = find_adapter(model)
    for block in adapter.blocks:
        with adapter.prunable_linears(block) as linears:
            for linear in linears.values():
                if ((linear.weight.reshape(linear.out_features, -1, 4) != 0).sum(-1) > 2).any():
                    return False
    return True


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_prunes_with_permutation_checked_on_each_reordering(family):
    # magnitude has no calibration stream: each reordering is checked on its unit (Bloom's MLP takes the residual)
    for method in ("magnitude", "wanda"):
        model = tiny_model(family)
        report = prunelab.prune(model, calibration=random_ids(8, 32), method=method, pattern="2:4", permute=True,
                                reconstruct="none", progress=False)
        assert any("permuted" in r for r in report["layers"]) and two_four_views(model)


@pytest.mark.parametrize("family, method", [("qwen3_moe", "wanda"), ("gpt_oss", "sparsegpt"),
                                            ("qwen2_moe", "magnitude")])
def test_permuted_experts_keep_more_of_the_score_and_stay_two_four(family, method):
    model = tiny_model(family)
    report = prunelab.prune(model, calibration=random_ids(16, 32), method=method, pattern="2:4", permute=True,
                            reconstruct="none", progress=False)
    permuted = {(r["block"], r["layer"]): r["permuted"] for r in report["layers"] if "permuted" in r}
    experts = [p for (_, layer), p in permuted.items() if ".experts.down_proj." in layer]
    assert len(experts) == 2 * 4  # every expert of both blocks (each reached by a calibration token)
    assert all(p["kept_after"] >= p["kept_before"] for p in permuted.values())
    assert sum(p["kept_after"] - p["kept_before"] for p in experts) > 0
    assert two_four_views(model)


def test_matrix_reconstruction_compares_each_linear_with_its_reordered_dense_copy():
    # dense propagation: the MLP reads the dense model's activations, so gate/up are pruned as without permute;
    # their dense copies must be reordered too, or their targets come in another order than their outputs
    ids = random_ids(24, 32)
    runs = {}
    for permute in (False, True):
        model = tiny_model("llama", intermediate_size=256)
        report = prunelab.prune(model, calibration=ids, method="wanda", pattern="2:4", permute=permute,
                                reconstruct={"granularity": "matrix", "propagation": "dense", "lr": 1e-3},
                                samples=16, progress=False)
        runs[permute] = {(r["submodel"], m["layer"]): m for r in report["reconstruction"]["submodels"]
                         for m in r.get("matrices", [])}
        assert two_four_in_the_stored_layout(model)
    for key in runs[True]:
        plain, permuted = runs[False][key], runs[True][key]
        assert permuted["loss_heldout_after"] < permuted["loss_heldout_before"]
        if key[1] in ("mlp.gate_proj", "mlp.up_proj"):
            assert permuted["loss_train_before"] == pytest.approx(plain["loss_train_before"], rel=1e-4)


@pytest.mark.parametrize("half_index", [0, 1])
def test_a_reordered_half_passes_on_what_its_pruned_weights_compute(half_index):
    # the writer's inputs, kept from its statistics pass, are in the old order: its outputs must read them reordered
    model = tiny_model("llama")
    adapter = find_adapter(model)
    stream = capture_block_inputs(model, adapter.blocks, random_ids(16, 32), None, 8, torch.float32)
    inputs = stream.hidden.clone()
    pruner = HalfPruner(RunConfig(method="wanda", pattern="2:4", permute=True), adapter.blocks_prefix, adapter)
    half = adapter.halves(adapter.blocks[0])[half_index]
    with adapter.prunable_linears(adapter.blocks[0]) as linears:
        pruner.prune_half(0, half, linears, stream, need_output=True)
    assert "permuted" in pruner.records[-1]
    with torch.no_grad():
        for b, rows in stream.batches():
            assert torch.allclose(stream.hidden[rows], half(inputs[rows], stream.block_kwargs[0][b]), atol=1e-5)


def test_a_permuted_run_saves_a_two_four_checkpoint_that_reloads_and_says_what_it_kept(tiny_dir, texts, tmp_path):
    calib, evaluation = texts
    out = tmp_path / "run"
    report = prunelab.run(dict(model=str(tiny_dir), calib=str(calib), eval=str(evaluation), samples=8, seqlen=32,
                               eval_seqlen=32, eval_windows=4, pattern="2:4", permute=True, reconstruct="none",
                               out=str(out)), progress=False)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert two_four_in_the_stored_layout(reloaded)
    permuted = [r for r in report["layers"] if "permuted" in r]
    assert len(permuted) == 4  # o_proj and down_proj of both blocks
    markdown = (out / "REPORT.md").read_text()
    assert "| channels permuted | 4 layers; the pattern keeps " in markdown
    before = sum(r["permuted"]["kept_before"] for r in permuted) / 4
    assert f"keeps {before:.2%} → " in markdown
