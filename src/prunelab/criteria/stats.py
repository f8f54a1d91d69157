"""Statistics of a linear layer's inputs, accumulated batch by batch in float32 by hooks."""

from __future__ import annotations

import torch

from ..distributed import all_sum, all_sum_float


class InputNorms:
    """Wanda's ‖X_j‖²: the squared L2 norm of every input feature j over all calibration tokens."""

    def __init__(self, features: int, device: torch.device):
        self.sq_norms = torch.zeros(features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:  # x: [tokens, features]
        x = x.float()
        self.sq_norms += (x * x).sum(0)
        self.tokens += x.shape[0]

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.sq_norms).all())

    def reduce(self) -> None:
        """Sum over the processes of a data-parallel run (each saw its share of the windows)."""
        all_sum(self.sq_norms)
        self.tokens = int(all_sum_float(self.tokens))

    def reorder(self, order: torch.Tensor) -> None:
        """The statistics of the inputs reordered as `x[..., order]` (channel permutation)."""
        self.sq_norms = self.sq_norms[order.to(self.sq_norms.device)]


class Hessian:
    """SparseGPT's H = 2 XᵀX / n, kept as the running sum XᵀX and the token count n."""

    def __init__(self, features: int, device: torch.device):
        self.xtx = torch.zeros(features, features, dtype=torch.float32, device=device)
        self.tokens = 0
        self.solved: dict = {}  # SparseGPT's factorisation, shared by the layers reading this input

    def add(self, x: torch.Tensor) -> None:
        x = x.float()
        self.xtx.addmm_(x.T, x)
        self.tokens += x.shape[0]

    @property
    def matrix(self) -> torch.Tensor:
        return self.xtx * (2.0 / max(self.tokens, 1))

    @property
    def sq_norms(self) -> torch.Tensor:
        """‖X_j‖², as InputNorms has it: the diagonal of XᵀX."""
        return self.xtx.diagonal()

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.xtx).all())

    def reduce(self) -> None:
        all_sum(self.xtx)
        self.tokens = int(all_sum_float(self.tokens))

    def reorder(self, order: torch.Tensor) -> None:
        order = order.to(self.xtx.device)
        self.xtx = self.xtx[order][:, order]
        self.solved = {}
