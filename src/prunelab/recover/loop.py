"""The reconstruction loop: AdamW on one submodel's remaining weights, the pruning mask kept exact.

A *problem* pairs a submodel's predictions with its targets window by window:

    problem.windows(split)            -> number of windows in "train" or "heldout"
    problem.batch(split, windows)     -> (prediction, target, token_mask or None)
    problem.scale                     -> 1/σ per target channel, for `cmse`

and the loop minimises, over the submodel's trainable parameters θ,

    L(θ) = mean over non-pad tokens t of ℓ(f_θ(x)_t, y_t)

    mse     ℓ = ‖p − y‖² / d
    cmse    ℓ = Σ_c (p_c − y_c)² / σ_c² / d   (each channel's error relative to its size: σ_c² is the mean of y_c²
                                          over the training windows' tokens, `Problem.scale` = 1/σ)
    nmse    ℓ = ‖p − y‖² / ‖y‖²            (each token's error relative to its target's size)
    cosine  ℓ = 1 − cos(p, y)

`cmse` is there for residual streams in which a few massive channels hold most of the energy
(`benchmarks/massive_channels.py`: 5 of Gemma 3 270M's 640 hold 78–99 % of it after every block, and the
next pre-norm reads them at 0.01–0.5× its median gain). Plain MSE spends the submodel's training on them;
on Gemma, Wanda 50 % + attn-mlp gives perplexity 93.76 with mse and 67.73 with cmse (dense 55.04).

with AdamW, a linear warm-up over the first `warmup` fraction of steps and a linear decay to 0.
Pruned weights are zeroed again after every step, so the mask is exact; AdamW is elementwise, so
whatever it computes for a pruned weight never reaches a surviving one (masking the gradients as
well would leave every surviving weight bit for bit the same, at the cost of one more pass).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch
from torch import nn

from .. import distributed
from ..errors import PrunelabError

PER_TOKEN_LOSS = {  # the names are config.LOSSES; `scale` is 1/σ per channel (cmse) or None
    "mse": lambda pred, target, scale: (pred - target).pow(2).mean(-1),
    "cmse": lambda pred, target, scale: ((pred - target) * scale).pow(2).mean(-1),
    "nmse": lambda pred, target, scale: (pred - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-12),
    "cosine": lambda pred, target, scale: 1 - nn.functional.cosine_similarity(pred, target, dim=-1, eps=1e-8),
}
SCALED_LOSSES = ("cmse",)  # those that need the targets' channel sizes (`channel_scale`)


def channel_scale(targets: torch.Tensor, token_mask: Callable[[list[int]], torch.Tensor | None],
                  chunk: int = 8) -> torch.Tensor:
    """1/σ_c, σ_c² = the mean of targets[..., c]² over the non-pad tokens (of every process's windows).
    A channel that is (nearly) zero everywhere is weighted as if it had a millionth of the median one's
    mean square (the median: a few massive channels would lift the mean by orders of magnitude)."""
    squares = torch.zeros(targets.shape[-1], dtype=torch.float64, device=targets.device)
    tokens = 0
    for start in range(0, targets.shape[0], chunk):
        rows = list(range(start, min(start + chunk, targets.shape[0])))
        y = targets[rows].float().flatten(0, -2)
        mask = token_mask(rows)
        if mask is not None:
            y = y[mask.flatten()]
        squares += y.pow(2).sum(0, dtype=torch.float64)
        tokens += y.shape[0]
    squares, tokens = distributed.all_sum(squares), distributed.all_sum_float(tokens)
    mean_square = squares / max(tokens, 1)
    return mean_square.clamp_min(1e-6 * float(mean_square.median()) + 1e-30).rsqrt().float()


def _per_token(loss: str, pred: torch.Tensor, target: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    if loss not in PER_TOKEN_LOSS:
        raise PrunelabError(f"unknown reconstruction loss {loss!r}")
    if loss in SCALED_LOSSES and scale is None:
        raise PrunelabError(f"reconstruction loss {loss!r} needs the targets' channel scale")
    return PER_TOKEN_LOSS[loss](pred.float(), target.float(), scale)


def token_loss(loss: str, pred: torch.Tensor, target: torch.Tensor, token_mask: torch.Tensor | None,
               scale: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the per-token loss over the tokens that are not padding."""
    per_token = _per_token(loss, pred, target, scale)
    if token_mask is not None:
        per_token = per_token[token_mask]
    return per_token.mean()


class Diverged(PrunelabError):
    """The training loss became NaN or infinite."""


def finite_or_inf(loss: float) -> float:
    """A loss to rank learning rates by: NaN compares neither better nor worse, so it counts as inf."""
    return loss if math.isfinite(loss) else math.inf


class Problem(Protocol):
    def windows(self, split: str) -> int: ...

    def batch(self, split: str, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]: ...

    scale: torch.Tensor | None  # 1/σ per target channel (`channel_scale`) for the scaled losses, else None


@dataclass
class Trainable:
    """The parameters trained together, with the surviving entries of each pruned tensor."""

    params: list[nn.Parameter]
    kept: list[torch.Tensor | None]  # bool, False where the weight was pruned; None for dense tensors

    @classmethod
    def of(cls, params: list[nn.Parameter], masked: set[int]) -> Trainable:
        """`masked`: ids of the parameters whose zeros are the pruning mask (every other zero may move)."""
        return cls(params, [p.detach() != 0 if id(p) in masked else None for p in params])

    def count(self) -> int:
        return sum(int(k.sum()) if k is not None else p.numel() for p, k in zip(self.params, self.kept))

    def enforce_mask(self) -> None:
        """Zero the pruned weights again. Multiplying by the bool mask: 4x faster on CPU than masked_fill_
        (1.5 ms against 6.2 ms for one MLP half of SmolLM2), and it runs after every optimiser step."""
        with torch.no_grad():
            for p, k in zip(self.params, self.kept):
                if k is not None:
                    p.mul_(k)

    def snapshot(self, spill: bool = False) -> list[torch.Tensor | Spilled]:
        """The values, of a pruned tensor only its surviving entries: half the memory at 50 % (an 8B
        model's MLP half holds 0.7 GB of float32 weights, and a run keeps a snapshot beside its optimiser).
        With `spill`, each piece goes to a temporary file as soon as it is taken (a streamed model, whose
        peak is the training of its largest half)."""
        pieces = (p.detach().clone() if k is None else torch.masked_select(p.detach(), k)
                  for p, k in zip(self.params, self.kept))
        return [Spilled(piece) if spill else piece for piece in pieces]

    def restore(self, state: list[torch.Tensor | Spilled]) -> None:
        with torch.no_grad():
            for p, k, s in zip(self.params, self.kept, state):
                s = s.load() if isinstance(s, Spilled) else s
                if k is None:
                    p.copy_(s)
                else:
                    p.zero_().masked_scatter_(k, s)


class Spilled:
    """A tensor's bytes in an anonymous temporary file (gone when this is), written and read with plain
    file I/O: not memory-mapped, so they sit in the OS's file cache, not in the process's resident memory."""

    def __init__(self, tensor: torch.Tensor):
        self.shape, self.dtype, self.device = tensor.shape, tensor.dtype, tensor.device
        self.file = tempfile.TemporaryFile(prefix="prunelab-snapshot-")
        tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tofile(self.file)
        self.file.flush()

    def load(self) -> torch.Tensor:
        self.file.seek(0)
        data = torch.from_numpy(np.fromfile(self.file, dtype=np.uint8))
        return data.view(self.dtype).reshape(self.shape).to(self.device)


def adamw(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the fused kernel where PyTorch has one: on CPU the default per-tensor loop took 11 ms
    a step for one MLP half of SmolLM2 (1.3 M weights), as long as its forward pass; fused, 1.1 ms.

    Not for a parameter with gaps in its memory (the per-expert views of Llama 4's and GPT-OSS's transposed
    expert tensors): PyTorch 2.13's fused CPU kernel walks each tensor's memory in order, which is right where
    the parameter, its gradient and its moments share one dense layout (autograd gives a dense parameter's
    gradient its strides: GPT-2's held Conv1D weights), and for a slice of a transposed tensor takes the wrong
    gradient entries and writes past the slice (`test_adamw_steps_a_strided_parameter_like_a_contiguous_one`)."""
    fused = all(p.device.type in ("cpu", "cuda") and dense(p) for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def dense(t: torch.Tensor) -> bool:
    """Whether `t`'s elements fill its memory span without gaps, in some order of its dimensions."""
    span = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n > 1):
        if stride != span:
            return False
        span *= size
    return True


def schedule(steps: int, warmup: float) -> Callable[[int], float]:
    """Learning-rate factor at each step: linear warm-up, then linear decay to 0 after the last step."""
    warm = int(math.ceil(warmup * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (steps - step) / max(steps - warm, 1))
    return factor


def fit(trainable: Trainable, problem: Problem, lr: float, loss: str, epochs: int, batch_size: int,
        warmup: float, weight_decay: float, seed: int, on_step: Callable[[], None] | None = None) -> dict:
    """Train `trainable` on the problem's training windows; returns {"steps"}.

    In one process each parameter takes its AdamW step as soon as its gradient is complete, inside the
    backward pass, and its gradient is freed at once: only one tensor's gradient is ever held (0.23 GB
    of an 8B model's MLP half instead of 0.70 GB). AdamW is elementwise, so the weights are bit for bit
    those of one step over all of them. Data parallel processes sum whole gradients first."""
    local = problem.windows("train")
    offset, windows = distributed.layout(local)  # data parallel: this process holds windows offset.. of them all
    steps_per_epoch = math.ceil(windows / batch_size)
    steps = epochs * steps_per_epoch
    shared = distributed.size() > 1
    for p in trainable.params:
        p.requires_grad_(True)
    groups = [trainable.params] if shared else [[p] for p in trainable.params]
    optimizers = [adamw(group, lr, weight_decay) for group in groups]
    # set by hand, not by an LRScheduler per optimizer: a parameter with no gradient in a step (a routed expert
    # no token reached) skips its AdamW step, and PyTorch's schedulers warn about that on every submodel
    factor = schedule(steps, warmup)
    hooks = [] if shared else [p.register_post_accumulate_grad_hook(_step_now(o)) for p, o in
                               zip(trainable.params, optimizers)]
    generator = torch.Generator().manual_seed(seed)
    try:
        for epoch in range(epochs):
            order = torch.randperm(windows, generator=generator)
            for start in range(0, windows, batch_size):
                rate = lr * factor(epoch * steps_per_epoch + start // batch_size)
                for optimizer in optimizers:
                    optimizer.param_groups[0]["lr"] = rate
                if shared:
                    optimizers[0].zero_grad(set_to_none=True)
                    _shared_step(trainable, problem, loss, order[start:start + batch_size], offset, local, lr)
                    optimizers[0].step()
                else:
                    pred, target, mask = problem.batch("train", order[start:start + batch_size])
                    value = token_loss(loss, pred, target, mask, problem.scale)
                    if not torch.isfinite(value):
                        _check_loss(value.item(), lr)
                    value.backward()  # the steps happen in here
                trainable.enforce_mask()
                if on_step is not None:
                    on_step()
    finally:
        for hook in hooks:
            hook.remove()
        for p in trainable.params:
            p.requires_grad_(False)
            p.grad = None
    return {"steps": steps}


def _step_now(optimizer: torch.optim.Optimizer):
    def hook(param: torch.Tensor) -> None:
        optimizer.step()
        param.grad = None
    return hook


def _check_loss(value: float, lr: float) -> None:
    if not math.isfinite(value):
        raise Diverged(f"reconstruction loss became {value} (lr {lr:g}); choose a smaller --lr or --lr auto")


def _shared_step(trainable: Trainable, problem: Problem, loss: str, step_windows: torch.Tensor, offset: int,
                 local: int, lr: float) -> None:
    """Data parallel: this process's part of one step's gradient (its windows among `step_windows`), summed
    with the others' so that every process holds the gradient of the mean over the whole step."""
    mine = step_windows[(step_windows >= offset) & (step_windows < offset + local)] - offset
    value, tokens = None, 0
    if mine.numel():
        pred, target, mask = problem.batch("train", mine)
        per_token = _per_token(loss, pred, target, problem.scale)
        per_token = per_token[mask] if mask is not None else per_token
        value, tokens = per_token.sum(), per_token.numel()
    total_tokens = distributed.all_sum_float(tokens)
    _check_loss(distributed.all_sum_float(value.item() if value is not None else 0.0), lr)
    if value is not None:
        (value / total_tokens).backward()
    distributed.all_sum_grads(trainable.params)


@torch.no_grad()
def evaluate(problem: Problem, split: str, loss: str, batch_size: int) -> float:
    """The loss over every non-pad token of the split's windows."""
    total, tokens = 0.0, 0
    windows = problem.windows(split)
    for start in range(0, windows, batch_size):
        pred, target, mask = problem.batch(split, torch.arange(start, min(start + batch_size, windows)))
        per_token = _per_token(loss, pred, target, problem.scale)
        if mask is not None:
            per_token = per_token[mask]
        total += per_token.sum().item()
        tokens += per_token.numel()
    total, tokens = distributed.all_sum_float(total), distributed.all_sum_float(tokens)  # data parallel
    return total / max(tokens, 1)
