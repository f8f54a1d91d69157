"""OWL: a sparsity per block from the dense model's outlier shares, the global ratio kept."""

import pytest
import torch
from tiny import random_ids, tiny_model

import prunelab
from prunelab.config import RunConfig
from prunelab.errors import PrunelabError
from prunelab.models.adapters import find_adapter
from prunelab.prune.layerwise import block_sparsities, owl_sparsities


def test_block_sparsities_follow_the_outliers_and_keep_the_weighted_mean():
    shares, sizes = [0.01, 0.03, 0.02, 0.05], [100, 100, 300, 100]
    got = block_sparsities(shares, sizes, 0.6, 0.1)
    assert sum(s * n for s, n in zip(got, sizes)) / sum(sizes) == pytest.approx(0.6, abs=1e-12)
    assert max(got) - min(got) == pytest.approx(0.2)  # the spread, both ways: 2 x 0.1
    assert sorted(range(4), key=lambda i: got[i]) == [3, 1, 2, 0]  # more outliers, fewer weights pruned
    assert block_sparsities([0.02] * 3, [1, 2, 3], 0.5, 0.1) == pytest.approx([0.5] * 3)  # nothing to tell apart
    with pytest.raises(PrunelabError, match="owl.spread"):  # the one block without outliers pays for the three
        block_sparsities([1.0, 1.0, 1.0, 0.0], [1, 1, 1, 1], 0.85, 0.1)  # with: 0.85 + 3/4 x 0.2 = 1.0


def dense_outlier_shares(model, ids, outlier):
    """By hand: every linear's inputs in one forward pass of the dense model, Wanda's scores with the inputs'
    root mean square, the share above `outlier` times each block's mean score."""
    adapter = find_adapter(model)
    inputs, handles = {}, []
    for i, block in enumerate(adapter.blocks):
        for name, linear in block.named_modules():
            if isinstance(linear, torch.nn.Linear):
                def hook(module, args, key=(i, name)):
                    inputs.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]))
                handles.append(linear.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    shares = []
    for i, block in enumerate(adapter.blocks):
        scores = torch.cat([
            (block.get_submodule(name).weight.abs() * torch.cat(inputs[(i, name)]).pow(2).mean(0).sqrt()).flatten()
            for (j, name) in inputs if j == i])
        shares.append(int((scores > outlier * scores.mean()).sum()) / scores.numel())
    return shares


@pytest.mark.parametrize("outlier", [2.0, 5.0])
def test_outlier_shares_are_the_dense_models(outlier):
    model, ids = tiny_model("llama", layers=3), random_ids(8, 32)
    config = RunConfig(layerwise="owl", owl={"outlier": outlier}, forward_batch=4)
    plan = owl_sparsities(model, find_adapter(model), ids, None, config, progress=False)
    expected = dense_outlier_shares(model, ids, outlier)
    assert [p["outlier_share"] for p in plan] == pytest.approx(expected, abs=1e-12)
    assert all(0 < d < 0.2 for d in expected) and len(set(expected)) == 3


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_each_block_gets_its_planned_sparsity(method):
    model, ids = tiny_model("llama", layers=4, intermediate_size=256), random_ids(8, 32)
    twin = tiny_model("llama", layers=4, intermediate_size=256)
    plan = owl_sparsities(twin, find_adapter(twin), ids, None, RunConfig(layerwise="owl", forward_batch=4),
                          progress=False)
    result = prunelab.prune(model, calibration=ids, method=method, sparsity=0.5, layerwise="owl", forward_batch=4,
                            reconstruct="none", progress=False)
    targets = {r["block"]: r["target"] for r in result["layers"]}
    assert [targets[i] for i in range(4)] == [p["sparsity"] for p in plan]  # planned on the dense model
    assert max(targets.values()) - min(targets.values()) > 0.05
    for i, block in enumerate(find_adapter(model).blocks):
        for name, linear in block.named_modules():
            if isinstance(linear, torch.nn.Linear):
                rows, cols = linear.weight.shape
                zeros = int((linear.weight == 0).sum())
                per_row = rows * int(cols * targets[i])  # each row, or the whole matrix, floors its count
                assert per_row <= zeros <= int(rows * cols * targets[i]), (i, name)
    assert result["sparsity"]["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_routed_experts_and_reconstruction_take_the_plan():
    model, ids, held = tiny_model("qwen2_moe", layers=4), random_ids(12, 32), random_ids(4, 32, seed=1)
    result = prunelab.prune(model, calibration=ids, heldout=held, method="wanda", sparsity=0.5, layerwise="owl",
                            owl={"spread": 0.1}, forward_batch=4, reconstruct={"lr": 1e-3}, progress=False)
    targets = sorted({(r["block"], r["target"]) for r in result["layers"]})
    assert len(targets) == 4 and max(t for _, t in targets) - min(t for _, t in targets) > 0.05
    for block, target in targets:
        layers = {k: v for k, v in result["sparsity"]["layers"].items() if f"layers.{block}." in k}
        zeros = sum(v["sparsity"] * torch.Size(v["shape"]).numel() for v in layers.values())
        assert zeros / sum(torch.Size(v["shape"]).numel() for v in layers.values()) == pytest.approx(target, abs=0.02)
    losses = [(r["loss_train_before"], r["loss_train_after"]) for r in result["reconstruction"]["submodels"]]
    assert all(after <= before for before, after in losses)  # a submodel training made worse is kept as pruned
    assert sum(after < before for before, after in losses) >= len(losses) // 2


@pytest.mark.parametrize("values, message", [
    ({"pattern": "2:4"}, "does not apply to pattern 2:4"),
    ({"method": "flap"}, "does not apply to method flap"),
    ({"sparsity": 0.05}, r"owl.spread"),
    ({"sparsity": 0.95}, r"owl.spread"),
    ({"owl": {"spread": "wide"}}, r"owl.spread must be a number"),
    ({"owl": {"outlier": 0}}, r"owl.outlier must be > 0"),
])
def test_owl_refusals(values, message):
    with pytest.raises(PrunelabError, match=message):
        RunConfig(**{"layerwise": "owl", **values})
    with pytest.raises(PrunelabError, match="layerwise must be one of uniform, owl"):
        RunConfig(layerwise="OWL")
