import pytest
import torch

from prunelab.criteria import Hessian, InputNorms, magnitude, ria, sparsegpt, wanda
from prunelab.criteria.sparsegpt import inverse_cholesky
from prunelab.errors import PrunelabError


def correlated_inputs(tokens=512, features=64, seed=0):
    """Correlated features with uneven norms, in no particular order, as in LLM activations."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=g)
    scale = torch.logspace(-0.5, 0.5, features)[torch.randperm(features, generator=g)]
    return (torch.randn(tokens, features, generator=g) @ mixing) * scale


def stats_of(cls, x):
    s = cls(x.shape[1], x.device)
    s.add(x[:200])
    s.add(x[200:])
    return s


def test_wanda_scores_weight_times_input_norm():
    x = correlated_inputs()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    (pruned,), _ = wanda([w], stats_of(InputNorms, x), 0.5, None)
    scores = w.abs() * x.norm(dim=0)
    expected_pruned = scores.argsort(dim=1, stable=True)[:, :32]
    assert (pruned.gather(1, expected_pruned) == 0).all()
    assert ((pruned == 0).sum(1) == 32).all()
    assert torch.equal(pruned[pruned != 0], w[pruned != 0])  # Wanda does not update kept weights


def test_magnitude_prunes_smallest_weights_of_the_matrix():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(4))
    (pruned,), _ = magnitude([w], None, 0.25, None)
    assert (pruned == 0).sum() == 128
    assert w[pruned == 0].abs().max() <= w[pruned != 0].abs().min()


def output_error(w, q, x):
    return ((x @ w.T - x @ q.T) ** 2).sum().item()


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_beats_mask_only_methods_on_layer_output_error(nm):
    x = correlated_inputs()
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(5))
    (q_sgpt,), info = sparsegpt([w], stats_of(Hessian, x), 0.5, nm, blocksize=32)
    (q_wanda,), _ = wanda([w], stats_of(InputNorms, x), 0.5, nm)
    assert (q_sgpt == 0).float().mean() == pytest.approx(0.5, abs=1e-6)
    if nm:
        assert ((q_sgpt != 0).reshape(48, 16, 4).sum(-1) <= 2).all()
    assert output_error(w, q_sgpt, x) < 0.9 * output_error(w, q_wanda, x)
    # the OBS update, not just the mask, is what reduces the error
    assert output_error(w, q_sgpt, x) < 0.8 * output_error(w, w * (q_sgpt != 0), x)
    assert info["damp_retries"] == 0


def test_sparsegpt_group_keeps_each_layers_budget():
    x = correlated_inputs()
    g = torch.Generator().manual_seed(6)
    q, k = torch.randn(32, 64, generator=g), 10 * torch.randn(16, 64, generator=g)  # very different scales
    (pq, pk), _ = sparsegpt([q, k], stats_of(Hessian, x), 0.5, None)
    assert (pq == 0).float().mean() == pytest.approx(0.5) and (pk == 0).float().mean() == pytest.approx(0.5)


def test_dead_inputs_are_handled():
    x = correlated_inputs()
    x[:, 5] = 0
    w = torch.randn(8, 64)
    (pruned,), info = sparsegpt([w], stats_of(Hessian, x), 0.5, None)
    assert info["dead_inputs"] == 1 and (pruned[:, 5] == 0).all() and torch.isfinite(pruned).all()


def test_failed_cholesky_retries_with_more_damping():
    rank_deficient = torch.ones(16, 16)  # singular: Cholesky fails without damping
    upper, damp, retries = inverse_cholesky(rank_deficient, damp=0.0)
    assert retries >= 1 and damp > 0 and torch.isfinite(upper).all()


def test_hopeless_hessian_raises_clear_error():
    with pytest.raises(PrunelabError, match="Cholesky"):
        inverse_cholesky(torch.full((4, 4), float("nan")), damp=0.01)


def test_ria_scores_relative_importance_times_a_root_of_the_input_norm():
    x = correlated_inputs()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(6))
    (pruned,), _ = ria([w], stats_of(InputNorms, x), 0.5, None)
    a = w.abs()
    scores = (a / a.sum(0) + a / a.sum(1, keepdim=True)) * x.norm(dim=0) ** 0.5
    expected = scores.flatten().argsort(stable=True)[:1024]  # compared over the whole matrix, as the reference does
    assert (pruned.flatten()[expected] == 0).all()
    assert (pruned == 0).sum() == 1024
    assert torch.equal(pruned[pruned != 0], w[pruned != 0])
    # alpha 0 is the data-free relative importance: the input norms no longer matter
    (free,), _ = ria([w], stats_of(InputNorms, x), 0.5, None, alpha=0.0)
    (free_other,), _ = ria([w], stats_of(InputNorms, x * torch.linspace(0.1, 10, 64)), 0.5, None, alpha=0.0)
    assert torch.equal(free, free_other) and not torch.equal(free, pruned)


def test_ria_keeps_small_rows_and_columns_that_wanda_would_empty():
    """A row of uniformly small weights: Wanda's per-matrix ranking would drop it whole, RIA's row share keeps
    some of it (the reason for the relative term)."""
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(7))
    w[3] *= 1e-3
    stats = stats_of(InputNorms, correlated_inputs(features=32))
    (pruned,), _ = ria([w], stats, 0.5, None)
    assert (pruned[3] != 0).any()
    scores = w.abs() * stats.sq_norms.sqrt()
    dropped = scores.flatten().argsort(stable=True)[:256].reshape(-1)
    assert set(range(3 * 32, 4 * 32)) <= set(dropped.tolist())  # whole-matrix Wanda scores would empty row 3


def test_ria_two_four_and_zero_columns():
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(8))
    w[:, 5] = 0  # a dead column: its shares are 0, not NaN
    (pruned,), _ = ria([w], stats_of(InputNorms, correlated_inputs(features=16)), 0.5, (2, 4))
    assert ((pruned != 0).reshape(8, 4, 4).sum(-1) <= 2).all()
    assert ((pruned == 0).reshape(8, 4, 4).sum(-1) == 2).all()
