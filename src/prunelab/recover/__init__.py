"""Recovery after pruning: local reconstruction (train one pruned submodel at a time to match the
dense model) with its training loop and per-submodel step, and the retraining baselines it is measured
against (full retraining, MaskLoRA)."""

from .loop import Trainable, evaluate, fit, schedule, token_loss
from .reconstruct import prune_and_reconstruct, submodels
from .retrain import retrain
from .structured import reconstruct_structured

__all__ = ["Trainable", "evaluate", "fit", "prune_and_reconstruct", "reconstruct_structured", "retrain", "schedule",
           "submodels", "token_loss"]
