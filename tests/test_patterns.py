import pytest
import torch

from prunelab.criteria.patterns import prune_mask


def test_unstructured_per_row_prunes_exact_count_in_every_row():
    scores = torch.rand(16, 100, generator=torch.Generator().manual_seed(0))
    mask = prune_mask(scores, 0.37, per_row=True)
    assert (mask.sum(1) == 37).all()
    # the pruned ones are the smallest of their row
    assert (scores[mask].reshape(16, 37).max(1).values <= scores[~mask].reshape(16, 63).min(1).values).all()


def test_unstructured_whole_matrix_uses_one_threshold():
    scores = torch.arange(40.0).reshape(4, 10)
    mask = prune_mask(scores, 0.5, per_row=False)
    assert mask.sum() == 20
    assert mask[:2].all() and not mask[2:].any()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 3)])
def test_n_of_m_keeps_exactly_n_per_group(n, m):
    scores = torch.rand(8, m * 6, generator=torch.Generator().manual_seed(1))
    mask = prune_mask(scores, nm=(n, m))
    kept = (~mask).reshape(8, 6, m).sum(-1)
    assert (kept == n).all()


def test_ties_are_broken_by_index_deterministically():
    scores = torch.ones(3, 8)  # 4-bit weights: many equal magnitudes
    mask = prune_mask(scores, 0.5)
    assert mask[:, :4].all() and not mask[:, 4:].any()
    nm_mask = prune_mask(scores, nm=(2, 4))
    assert nm_mask.reshape(3, 2, 4)[..., :2].all() and not nm_mask.reshape(3, 2, 4)[..., 2:].any()
