"""Pruning criteria. Each is a pure function of a weight and its input statistics."""

from .magnitude import magnitude
from .ria import ria
from .sparsegpt import sparsegpt
from .stats import Hessian, InputNorms
from .wanda import wanda

# name -> (statistics the criterion needs from layer inputs, or None when data-free; the criterion)
CRITERIA = {
    "magnitude": (None, magnitude),
    "wanda": (InputNorms, wanda),
    "sparsegpt": (Hessian, sparsegpt),
    "ria": (InputNorms, ria),
}

__all__ = ["CRITERIA", "Hessian", "InputNorms", "magnitude", "ria", "sparsegpt", "wanda"]
