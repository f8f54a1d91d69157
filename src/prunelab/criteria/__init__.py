"""Pruning criteria. Each is a pure function of a weight and its input statistics."""

from .magnitude import magnitude
from .ria import ria, ria_scores
from .sparsegpt import sparsegpt
from .stats import Hessian, InputNorms
from .wanda import wanda, wanda_scores

# name -> (statistics the criterion needs from layer inputs, or None when data-free; the criterion)
CRITERIA = {
    "magnitude": (None, magnitude),
    "wanda": (InputNorms, wanda),
    "sparsegpt": (Hessian, sparsegpt),
    "ria": (InputNorms, ria),
}

# name -> the score a channel permutation maximises under N:M (criteria/permutation.py): the criterion's own;
# SparseGPT's under a diagonal Hessian, |W_ij| · ‖X_j‖ (its sweep's w²/[H⁻¹]²_jj changes as it updates weights)
SALIENCY = {
    "magnitude": lambda w, stats, **_: w.float().abs(),
    "wanda": wanda_scores,
    "sparsegpt": wanda_scores,
    "ria": ria_scores,
}

__all__ = ["CRITERIA", "SALIENCY", "Hessian", "InputNorms", "magnitude", "ria", "sparsegpt", "wanda"]
