"""Retraining after pruning (or after reconstruction): the baselines local reconstruction is measured against.

Both methods minimise the next-token cross-entropy on calibration-source windows (never the evaluation text),

    L(θ) = − mean over predicted tokens t of  log p_θ(x_{t+1} | x_≤t)

with AdamW, a linear warm-up over the first `warmup` fraction of optimiser steps and a linear decay to 0,
until the token budget is spent:

    full      θ = every remaining weight; a pruned weight's gradient is zeroed and the weight re-zeroed
              after every step, so the mask (and an N:M pattern) survives exactly
    masklora  W' = W + (α / r) · M ⊙ (B A)   on every pruned linear, M = [W ≠ 0], B A of rank r,
              plus every bias and norm; merged into W at the end: M ⊙ keeps every pruned weight at 0

`lr: auto` trains each learning rate of the grid for a `probe` fraction of the steps from the same start
and keeps the one with the lowest held-out loss (held-out calibration windows, as reconstruction does).

Data parallel (torchrun): every process holds every window; each step's windows are split among the
processes, each divides its summed loss by the step's tokens over all of them, and the gradients are
summed before the step, so every process takes the step one process would (up to summation order).
"""

from __future__ import annotations

import math
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..config import RunConfig
from ..errors import PrunelabError
from ..evaluate.perplexity import summed_nll
from ..evaluate.sparsity import count_zeros
from ..precision import autocast, held_in_float32, matmul_precision, uses_bfloat16
from .loop import Diverged, Trainable, adamw, finite_or_inf, schedule

# Learning rates `auto` tries when no grid is given: full retraining moves every weight of a trained
# model and wants the small rates of fine-tuning; LoRA's B starts at 0 and needs larger ones.
EXTEND = 2  # probes beyond the grid's edge when its best rate lies there


class MaskedLowRank(torch.autograd.Function):
    """y = x (W + s · M ⊙ (B A))ᵀ with W frozen, keeping only x, A and B for the backward pass.

    Autograd through the plain expression would keep B A, its masked copy and the sum — three dense
    matrices per linear, more than full retraining's gradients. Here the update is rebuilt in backward:

        ∂L/∂x = g (W + s · M ⊙ (B A)),   G = s · M ⊙ (gᵀ x),   ∂L/∂B = G Aᵀ,   ∂L/∂A = Bᵀ G
    """

    @staticmethod
    def forward(ctx, x, weight, pruned, a, b, scale):
        ctx.save_for_backward(x, weight, pruned, a, b)
        ctx.scale = scale
        return F.linear(x, weight + (b @ a).masked_fill_(pruned, 0).mul_(scale))

    @staticmethod
    def backward(ctx, grad):
        x, weight, pruned, a, b = ctx.saved_tensors
        dtype = grad.dtype
        full = (weight.to(dtype) + (b.to(dtype) @ a.to(dtype)).masked_fill_(pruned, 0).mul_(ctx.scale))
        grad_x = grad @ full
        del full
        update = (grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1]).to(dtype))
        update.masked_fill_(pruned, 0).mul_(ctx.scale)
        grad_a, grad_b = b.to(dtype).T @ update, update @ a.to(dtype).T
        return grad_x.to(x.dtype), None, None, grad_a.to(a.dtype), grad_b.to(b.dtype), None


def masked_lora_linear():
    """PEFT's LoRA linear with its update multiplied by the pruning mask M = [W ≠ 0].

    PEFT computes the update in low rank, x ↦ B(A x); M ⊙ (B A) has no low-rank form, so forward goes
    through `MaskedLowRank`. Merging goes through `get_delta_weight`, hence exactly W + M ⊙ ΔW.
    """
    from peft.tuners.lora import layer

    class MaskedLoraLinear(layer.Linear):
        def update_layer(self, adapter_name, *args, **kwargs):
            super().update_layer(adapter_name, *args, **kwargs)
            self.register_buffer("pruned", self.get_base_layer().weight == 0, persistent=False)

        def get_delta_weight(self, adapter) -> torch.Tensor:
            return super().get_delta_weight(adapter).masked_fill_(self.pruned, 0)

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            base = self.get_base_layer()
            if self.disable_adapters or self.merged:
                return base(x, *args, **kwargs)
            (adapter,) = [a for a in self.active_adapters if a in self.lora_A]  # one adapter: ours
            y = MaskedLowRank.apply(x, base.weight, self.pruned, self.lora_A[adapter].weight,
                                    self.lora_B[adapter].weight, self.scaling[adapter])
            return y if base.bias is None else y + base.bias.to(y.dtype)

    return MaskedLoraLinear


class _ModuleTree(nn.Module):
    """The model as PEFT is shown it: its modules, not its config. With a transformers config PEFT rewrites the
    targets of Mixture-of-Experts families it knows (DeepSeek, GLM-4-MoE, ERNIE 4.5 MoE, ...): each target named
    gate_proj, up_proj or down_proj (a shared expert's, a dense block's) becomes plain LoRA on the fused experts,
    and its merge fills the pruned zeros there while the named linear gets no adapter."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


class MaskLoRA:
    """LoRA adapters with masked updates on the pruned linears (built on PEFT), biases and norms trainable."""

    def __init__(self, model: nn.Module, linear_names: list[str], rank: int, alpha: float):
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise PrunelabError("--retrain masklora needs peft: pip install peft") from None
        targets = [f"model.{name}" for name in linear_names]
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, bias="none")
        config._register_custom_module({nn.Linear: masked_lora_linear()})  # PEFT's hook for custom LoRA layers
        with warnings.catch_warnings():  # peft reads transformers' deprecated name; nothing a user can change
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            self.peft = get_peft_model(_ModuleTree(model), config)
        adapted = {name.removeprefix("base_model.model.") for name, module in self.peft.named_modules()
                   if hasattr(module, "lora_A")}
        if adapted != set(targets):  # every pruned linear masked, nothing else adapted
            odd = sorted(adapted ^ set(targets))[0].removeprefix("model.")
            raise PrunelabError(f"--retrain masklora: PEFT did not adapt exactly the pruned linears ({odd}); "
                                "use --retrain full")
        lora = [p for n, p in self.peft.named_parameters() if "lora_" in n]
        # biases and norms: every 1-D parameter outside the adapters (embeddings and matrices stay frozen)
        vectors = [p for n, p in self.peft.named_parameters() if p.dim() == 1 and "lora_" not in n]
        self.trainable = Trainable(lora + vectors, [None] * (len(lora) + len(vectors)))

    def merge(self) -> nn.Module:
        return self.peft.merge_and_unload().model


def token_nll(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy of the windows `ids` and the number of predicted tokens."""
    return summed_nll(model(input_ids=ids, use_cache=False).logits, ids), ids[:, 1:].numel()


class Retraining:
    """One retraining run: the trainable parameters, the windows, the schedule, the loss curve."""

    def __init__(self, model: nn.Module, masked: list[torch.Tensor], linear_names: list[str], config: RunConfig,
                 train_ids: torch.Tensor, heldout_ids: torch.Tensor, progress: bool):
        self.rt, self.seed, self.progress = config.retrain, config.seed, progress
        self.model, self.lora = model, None
        self.device = next(model.parameters()).device
        # auto: bfloat16 on GPUs only; on CPUs with native bfloat16 its effect on retraining is unmeasured
        self.bfloat16 = uses_bfloat16(self.rt.precision, self.device, auto_on_cpu=False)
        self.train_ids, self.heldout_ids = train_ids, heldout_ids
        if self.rt.method == "masklora":
            torch.manual_seed(self.seed)  # LoRA's A is drawn at random: the run's seed makes it reproducible
            self.lora = MaskLoRA(model, linear_names, self.rt.rank, self.rt.alpha)
            self.trainable = self.lora.trainable
        else:
            self.trainable = Trainable.of(list(model.parameters()), {id(p) for p in masked})
        per_step = self.rt.batch_size * self.rt.accumulate
        self.steps = math.ceil(train_ids.shape[0] / per_step)

    @torch.no_grad()
    def heldout_loss(self) -> float:
        self.model.eval()
        total, tokens = 0.0, 0
        with autocast(self.bfloat16, self.device):
            for batch in _mine(self.heldout_ids).split(self.rt.batch_size):
                nll, count = token_nll(self.model, batch.to(self.device))
                total, tokens = total + nll.item(), tokens + count
        return distributed.all_sum_float(total) / distributed.all_sum_float(tokens)

    def step_windows(self, step: int) -> torch.Tensor:
        per_step = self.rt.batch_size * self.rt.accumulate
        return self.order[step * per_step:(step + 1) * per_step]

    def step(self, optimizer, scheduler, step: int) -> tuple[float, int]:
        """One optimiser step over `accumulate` micro-batches; the mean loss and the tokens it saw."""
        windows = self.step_windows(step)
        predicted = windows.numel() * (self.train_ids.shape[1] - 1)  # over every process's part of the step
        total = 0.0
        for part in _mine(windows).split(self.rt.batch_size):
            with autocast(self.bfloat16, self.device):
                nll, _ = token_nll(self.model, self.train_ids[part].to(self.device))
            loss = nll / predicted
            loss.backward()
            total += loss.item()
        total = distributed.all_sum_float(total)
        if not math.isfinite(total):
            raise Diverged(f"retraining loss became {total}; choose a smaller --retrain-lr")
        distributed.all_sum_grads(self.trainable.params)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        self.trainable.enforce_mask()
        return total, windows.numel() * self.train_ids.shape[1]

    def train(self, lr: float, steps: int, curve: dict | None = None) -> dict:
        """`steps` optimiser steps at peak rate `lr` (warm-up and decay over those steps)."""
        rt = self.rt
        params = self.trainable.params
        for p in params:
            p.requires_grad_(True)
        optimizer = adamw(params, lr, rt.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(steps, rt.warmup))
        self.order = torch.randperm(self.train_ids.shape[0], generator=torch.Generator().manual_seed(self.seed))
        evals = {round(steps * k / rt.evals) for k in range(1, rt.evals + 1)}
        tokens = 0
        bar = tqdm(range(steps), desc=f"retrain {rt.method} lr {lr:g}", unit="step", disable=not self.progress)
        try:
            for step in bar:
                self.model.train()
                loss, seen = self.step(optimizer, scheduler, step)
                tokens += seen
                bar.set_postfix(loss=f"{loss:.3f}")
                if curve is not None:
                    curve["train"].append([step + 1, tokens, loss])
                    if step + 1 in evals:
                        curve["heldout"].append([step + 1, tokens, self.heldout_loss()])
        finally:
            for p in params:
                p.requires_grad_(False)
                p.grad = None
            self.model.eval()
        return {"steps": steps, "tokens": tokens}

    def choose_lr(self) -> tuple[float, dict]:
        """The fixed lr, or the grid's best held-out loss after a `probe` fraction of the steps each; a best
        rate at the grid's edge is followed one factor of 3 further, at most `EXTEND` times."""
        rt = self.rt
        if rt.lr != "auto":
            return float(rt.lr), {"mode": "fixed", "lr": float(rt.lr)}
        grid = sorted(rt.grid)
        probe_steps = max(1, round(rt.probe * self.steps))
        start, losses, tokens = self.trainable.snapshot(), {}, 0
        for extended in range(EXTEND + 1):
            for lr in (lr for lr in grid if lr not in losses):
                self.trainable.restore(start)
                try:
                    tokens += self.train(lr, probe_steps)["tokens"]
                    losses[lr] = finite_or_inf(self.heldout_loss())
                except Diverged:  # a probe that diverges loses; the others go on
                    # counted as its planned tokens, an upper bound: it stopped somewhere in them
                    tokens += probe_steps * rt.batch_size * rt.accumulate * self.train_ids.shape[1]
                    losses[lr] = math.inf
            best = min(losses, key=losses.get)
            if math.isinf(losses[best]):
                raise Diverged(f"retraining diverged at every lr of the grid {grid}; "
                               "choose a smaller --retrain-lr-grid")
            if extended == EXTEND or best not in (grid[0], grid[-1]):
                break
            grid = sorted({*grid, best * 3 if best == grid[-1] else best / 3})
        self.trainable.restore(start)
        best = min(losses, key=losses.get)
        # still at an edge after every extension: a wider grid might do better, and the report says so
        return best, {"mode": "auto", "grid": grid, "probe_steps": probe_steps, "probe_tokens": tokens,
                      "lr": best, "at_edge": best in (grid[0], grid[-1]),
                      "heldout_loss": {f"{lr:g}": loss if math.isfinite(loss) else None
                                       for lr, loss in sorted(losses.items())}}

    def run(self) -> tuple[nn.Module, dict]:
        """Train; the model to keep (MaskLoRA: merged) and the record for the report."""
        # transformers 5.2x renamed gradient checkpointing to activation checkpointing; older 5.x has the old name
        prefix = next((p for p in ("activation", "gradient") if hasattr(self.model, f"{p}_checkpointing_enable")), None)
        checkpointing = self.rt.checkpointing and prefix is not None
        if checkpointing:
            enable = getattr(self.model, f"{prefix}_checkpointing_enable")
            enable(**{f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}})
        started = time.perf_counter()
        try:
            curve = {"train": [], "heldout": [[0, 0, self.heldout_loss()]]}
            lr, lr_record = self.choose_lr()
            done = self.train(lr, self.steps, curve)
        finally:
            if checkpointing:
                getattr(self.model, f"{prefix}_checkpointing_disable")()
        model = self.lora.merge() if self.lora is not None else self.model
        rt = self.rt
        return model, {
            "method": rt.method, "lr": lr_record, "steps": done["steps"], "tokens_seen": done["tokens"],
            "tokens_seen_with_probes": done["tokens"] + lr_record.get("probe_tokens", 0),
            "trainable": self.trainable.count(), "windows": self.train_ids.shape[0],
            "heldout_windows": self.heldout_ids.shape[0], "batch_size": rt.batch_size, "accumulate": rt.accumulate,
            "precision": matmul_precision(self.bfloat16),
            "checkpointing": checkpointing, "seconds": round(time.perf_counter() - started, 2),
            "heldout_loss_before": curve["heldout"][0][2], "heldout_loss_after": curve["heldout"][-1][2],
            "curve": curve, **({"rank": rt.rank, "alpha": rt.alpha} if rt.method == "masklora" else {})}


def _mine(windows: torch.Tensor) -> torch.Tensor:
    """This process's contiguous part of `windows` (all of them in one process; maybe none under torchrun)."""
    return torch.tensor_split(windows, distributed.size())[distributed.rank()]


def retrain(model: nn.Module, masked: dict[str, torch.Tensor], config: RunConfig, train_ids: torch.Tensor,
            heldout_ids: torch.Tensor, progress: bool = True) -> tuple[nn.Module, dict]:
    """Retrain the pruned `model` (`masked`: the state-dict names of its pruned weights) as `config.retrain` says."""
    named = dict(model.named_parameters())
    # the parameters themselves, not tensors taken from them earlier: a model held in bfloat16 was trained in
    # float32 by reconstruction, which gave its parameters new tensors
    pruned = {name: named[name] for name in masked if name in named}
    if config.retrain.method == "masklora" and not any(bool((w == 0).any()) for w in pruned.values()):
        raise PrunelabError("--retrain masklora keeps a pruning mask, but this model has no pruned weights "
                            "(use --retrain full, or prune first)")
    linear_names = [name.removesuffix(".weight") for name in masked if name.endswith(".weight")]
    zeros = count_zeros(pruned)
    with held_in_float32(model):  # as reconstruction trains; LoRA's float32 adapters would meet bfloat16 inputs too
        model, record = Retraining(model, list(pruned.values()), linear_names, config, train_ids, heldout_ids,
                                   progress).run()
    after = count_zeros(pruned)
    moved = [name for name in zeros if after[name] < zeros[name]][:3]
    if moved:  # by construction it cannot happen (re-zeroing after every step, masked LoRA updates) unless a
        # library changes what it was asked to do, as PEFT's MoE conversion once did: never hand such a model back
        raise PrunelabError(f"retraining changed the pruning mask of {', '.join(moved)}; nothing was saved")
    return model, {**record, "mask_kept": True}
