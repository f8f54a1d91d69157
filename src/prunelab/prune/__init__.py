"""The sequential pruning pass over a model's half-blocks; the criteria it applies live in `criteria/`."""

from .sequential import HalfPruner, prune_model

__all__ = ["HalfPruner", "prune_model"]
