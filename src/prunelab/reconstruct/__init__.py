"""Local reconstruction: train one pruned submodel at a time to match the dense model (SPEC §3)."""

from .loop import Trainable, evaluate, fit, schedule, token_loss
from .sequential import prune_and_reconstruct, submodels

__all__ = ["Trainable", "evaluate", "fit", "prune_and_reconstruct", "schedule", "submodels", "token_loss"]
