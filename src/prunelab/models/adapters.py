"""Architecture knowledge, one small adapter per family, discovered from the module tree.

An adapter answers three questions about a decoder block: where its attention half is, where its
MLP half is, and which linear layers may be pruned. Families are recognised by the *structure* of
the block (which child modules and projections exist), never by the model's name.
"""

from __future__ import annotations

import copy
import functools
import inspect
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import PrunelabError
from .conv1d import HeldConv1D


def _has(module: nn.Module | None, *names: str) -> bool:
    return module is not None and all(isinstance(getattr(module, n, None), nn.Module) for n in names)


@dataclass
class Half:
    """The attention or MLP half of a decoder block, as the residual stream sees it.

    `run(h, kwargs)` computes the half's branch up to and including its residual-writing linear
    (`writer`, whose output it returns); `finish(h, y)` adds that output `y` to the residual
    stream (with any norm the architecture applies), giving the half's output. A half whose
    linears depend on routing (experts) has no single writer: `writer` is None.

    Parallel blocks (GPT-NeoX, GPT-J, Phi-1/2, Falcon, Cohere) compute h + attention(h) + MLP(h): both
    branches read the block's input, so no point of the residual stream lies between them. Their
    attention half is `deferred`: its output is its input, and the MLP half, which reads that same
    input, adds both branches (`beside` is the attention half). Each half is still pruned on its own
    inputs, in order; the two are trained together, as one submodel.
    """

    name: str
    modules: tuple[nn.Module, ...]  # the linears inside these modules belong to this half
    run: Callable[[torch.Tensor, dict], torch.Tensor]
    finish: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    writer: nn.Module | None
    norms: tuple[nn.Module, ...] = ()  # norms the half applies outside `modules` (pre-norm, post-norm)
    output_norm: nn.Module | None = None  # a norm between the writer and the residual add (Gemma's sandwich)
    reads_raw_stream: bool = False  # no norm before the branch (OLMo 2): it sees the stream's magnitude
    deferred: bool = False  # a parallel block's attention: the MLP half adds its branch
    beside: Half | None = None  # a parallel block's MLP half: the attention half whose branch it adds

    def owns(self, linear: nn.Module) -> bool:
        return any(linear is m for module in self.modules for m in module.modules())

    def parameters(self) -> list[nn.Parameter]:
        """Every parameter the half computes with, once each; the two halves of a block partition it."""
        found: dict[int, nn.Parameter] = {}
        for module in (*self.modules, *self.norms):
            for p in module.parameters():
                found.setdefault(id(p), p)
        return list(found.values())

    def output(self, h: torch.Tensor, y: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The half's output, from its input `h` and what its writer returned, `y`."""
        if self.deferred:
            return h
        out = self.finish(h, y)
        return out if self.beside is None else self.beside.finish(out, self.beside.run(h, kwargs))

    def __call__(self, h: torch.Tensor, kwargs: dict) -> torch.Tensor:
        return h if self.deferred else self.output(h, self.run(h, kwargs), kwargs)


@dataclass
class Width:
    """A half-block's width, for structured (width) pruning. Its units are groups of the writer's input
    channels; removing unit u removes those columns of the writer and, from each reader (the linears
    that produce those channels), the output rows `readers[name][u]`."""

    half: str  # "attention" | "mlp"
    unit: str  # what one unit is, for reports
    path: str  # the module holding the linears, relative to the block
    module: nn.Module
    writer: str
    readers: dict[str, list[list[int]]]
    units: list[list[int]]
    shared: dict[str, list[int]] = field(default_factory=dict)  # reader rows no unit owns, always kept (the one key
    # and value head of a multi-query attention whose q, k and v are fused)

    def linear(self, name: str) -> nn.Linear:
        return getattr(self.module, name)


@dataclass
class Channels:
    """Input channels of a half's writer that can be reordered without changing what the half computes.

    Channel c of pool p is the writer's input columns `columns[p, :, c]` (one for an MLP channel; one per
    query head reading a value head's dimension) and the output rows `rows[name][p, :, c]` (biases too) of
    each linear that produces it (gate and up; fused gate_up: two rows; the value projection). Permuting a
    pool's channels in all of these at once leaves the half's output as it was. Each `columns[p, j]` is a run
    of consecutive columns, so an N:M group of the reordered writer lies within one pool.
    """

    writer: str  # linear names as `prunable_linears` gives them
    columns: torch.Tensor  # [pools, copies, channels]
    rows: dict[str, torch.Tensor]  # producer -> [pools, copies, channels]
    # What the producers and the writer compute together, x -> output (an MLP, an expert), on which a reordering
    # can be checked where the half's output cannot be (a routed half runs its experts as routing decides)
    unit: Callable[[torch.Tensor], torch.Tensor] | None = None


def _runs(pools: int, copies: int, channels: int, stride: int | None = None) -> torch.Tensor:
    """[pools, copies, channels] indices: copy j of pool p is the run of `channels` from (p·copies + j)·stride."""
    stride = channels if stride is None else stride
    starts = torch.arange(pools * copies).reshape(pools, copies, 1) * stride
    return starts + torch.arange(channels)


def scale_output(module: nn.Module, s: float) -> None:
    """Multiply what `module` (a linear, an embedding or a norm) returns by `s`, in its weights.

    Norms that compute x̂ · (1 + w) (Gemma) are recognised by what they return with w = 0.
    """
    with torch.no_grad():
        affine = [t for t in (module.weight, getattr(module, "bias", None)) if isinstance(t, torch.Tensor)]
        offset = False
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            kept = [t.detach().clone() for t in affine]
            for t in affine:
                t.zero_()
            probe = torch.randn(2, module.weight.shape[-1], dtype=module.weight.dtype, device=module.weight.device)
            offset = bool(module(probe).abs().amax() > 0)
            for t, k in zip(affine, kept):
                t.copy_(k)
        for t in affine:
            t.mul_(s)
        if offset:
            module.weight.add_(s - 1)  # (1 + w') = s (1 + w)


def tied_head(model: nn.Module) -> bool:
    """Whether the LM head's weight is the input embedding's, one tensor under both names."""
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def first_output(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def find_block_list(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks: the ModuleList of identical modules that holds the most parameters."""
    best, best_params = None, 0
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        params = sum(p.numel() for p in module.parameters())
        if params > best_params and any(isinstance(m, nn.Linear) for m in module[0].modules()):
            best, best_params = module, params
    if best is None:
        conv1d = any(isinstance(m, Conv1D) for m in model.modules())
        raise PrunelabError(
            f"unsupported architecture {type(model).__name__}: no list of decoder blocks with linear layers found"
            + (" (its Conv1D layers are held as linears by prunelab.prune and the loaders, or by "
               "prunelab.models.conv1d.hold)" if conv1d else "")
        )
    return best


class Adapter(ABC):
    """Base adapter: subclasses say how to recognise a family's block and split it in halves."""

    family: ClassVar[str]
    expects: ClassVar[str]  # what the family's block looks like, for error messages

    def __init__(self, model: nn.Module):
        self.model = model
        self.blocks = find_block_list(model)

    @classmethod
    @abstractmethod
    def matches(cls, block: nn.Module) -> bool:
        """Whether `block` has this family's structure."""

    @abstractmethod
    def halves(self, block: nn.Module) -> tuple[Half, Half]:
        """(attention half, MLP half) of `block`; together they compute the block's forward."""

    @abstractmethod
    def residual_sources(self) -> list[nn.Module]:
        """The modules whose outputs sum to the first block's input (embeddings)."""

    def residual_writers(self, block: nn.Module) -> list[nn.Module]:
        """The modules whose outputs `block` adds to the residual stream: scaling their weights by s
        scales the block's contribution by s."""
        writers = []
        for half in self.halves(block):
            if half.writer is None:
                raise PrunelabError(
                    f"{half.name} of {type(block).__name__} routes tokens to experts: its residual "
                    "write has no single weight to rescale"
                )
            if half.reads_raw_stream:  # then scaling the earlier writers also changes what the earlier blocks compute
                raise PrunelabError(
                    f"{half.name} of {type(block).__name__} reads the residual stream without a norm, so magnitude "
                    "compensation cannot be folded into earlier weights (--no-compensation)"
                )
            writers.append(half.output_norm or half.writer)
        return writers

    def widths(self, block: nn.Module) -> tuple[Width, Width]:
        """(attention width, MLP width) of `block`, for width pruning."""
        raise PrunelabError(f"width pruning is not supported for the {self.family} family yet")

    def recount(self, block: nn.Module) -> None:
        """After width pruning narrowed `block`'s linears (or a loader rebuilt them narrow): set what its
        modules count from the new shapes, for a forward that reads a head count rather than the shapes."""
        return  # Llama-style forwards split their heads by the head size alone

    def channels(self, block: nn.Module) -> dict[str, Channels]:
        """{writer: its reorderable input channels} for the halves of `block` whose structure allows it."""
        return {}

    @property
    def stack(self) -> nn.Module:
        """The module that holds the blocks (and the embeddings and final norm around them)."""
        return next(m for m in self.model.modules() if any(c is self.blocks for c in m.children()))

    def final_norm(self) -> nn.Module | None:
        """The norm applied to the last block's output before the LM head, if any."""
        return None

    @property
    def blocks_prefix(self) -> str:
        return next(name for name, module in self.model.named_modules() if module is self.blocks)

    def prunable_weights(self) -> dict[str, torch.Tensor]:
        """State-dict name -> tensor of every prunable matrix; fused expert tensors count whole."""
        weights = {}
        for i, block in enumerate(self.blocks):
            routers = _routers(block)
            for name, module in block.named_modules():
                prefix = f"{self.blocks_prefix}.{i}.{name}"
                if isinstance(module, nn.Linear) and id(module) not in routers:
                    weights[f"{prefix}.weight"] = module.weight.detach()
                elif _is_fused_experts(module):
                    weights[f"{prefix}.gate_up_proj"] = module.gate_up_proj.detach()
                    weights[f"{prefix}.down_proj"] = module.down_proj.detach()
        return weights

    @contextmanager
    def prunable_linears(self, block: nn.Module) -> Iterator[dict[str, nn.Linear]]:
        """Every prunable linear of `block` by qualified name; fused experts appear as one linear each.

        Fused expert tensors are unfused into per-expert `nn.Linear` views for the duration, so
        in-place writes to those views land in the original 3-D parameters.
        """
        swapped = _unfuse_experts(block)
        try:
            routers = _routers(block)
            yield {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear) and id(m) not in routers}
        finally:
            for parent, name, original in swapped:
                setattr(parent, name, original)


# The projection layouts of a Llama-style block's halves, the residual writer last: separate or fused into one
# linear (Phi-3 and Phi-4 fuse both, GLM the MLP's; a fused linear's output rows are its parts' rows one after
# the other, in this order), multi-head latent attention (DeepSeek-V2/V3, with or without a low-rank query),
# MLPs without a gate (Nemotron, Arcee, StarCoder2, Moshi), and the token mixer of hybrid models' linear-attention
# blocks (`linear_attn`), which is that block's attention half.
ATTENTION_LAYOUTS = (("q_proj", "k_proj", "v_proj", "o_proj"), ("qkv_proj", "o_proj"),
                     ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
                     ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
                     # linear attention (Gated DeltaNet) of Qwen3-Next and Qwen3.5, in the blocks between full ones
                     ("in_proj_qkvz", "in_proj_ba", "out_proj"), ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a",
                                                                 "out_proj"),
                     # GPT-NeoX, Bloom, Falcon, Persimmon, CodeGen, GPTBigCode and MPT fuse q/k/v (in their own row
                     # orders); Phi-1/2 and GPT-J name the writer otherwise
                     ("query_key_value", "dense"), ("q_proj", "k_proj", "v_proj", "dense"),
                     ("q_proj", "k_proj", "v_proj", "out_proj"), ("qkv_proj", "out_proj"), ("c_attn", "c_proj"),
                     ("Wqkv", "out_proj"))
MLP_LAYOUTS = (("gate_proj", "up_proj", "down_proj"), ("gate_up_proj", "down_proj"), ("up_proj", "down_proj"),
               ("c_fc", "c_proj"), ("fc1", "fc2"), ("dense_h_to_4h", "dense_4h_to_h"), ("fc_in", "fc_out"))


def layout(module: nn.Module | None, layouts: tuple[tuple[str, ...], ...]) -> tuple[str, ...] | None:
    """The first of `layouts` whose linears `module` has (gated before gateless), or None."""
    return next((names for names in layouts if _has(module, *names)), None)


def _child(block: nn.Module, *names: str) -> nn.Module | None:
    """The first of the block's children `names` it has, or None."""
    return next((getattr(block, n) for n in names if getattr(block, n, None) is not None), None)


def _mixer(block: nn.Module) -> nn.Module | None:
    """The block's token mixer: `self_attn`, `linear_attn` in a hybrid model's linear-attention blocks, or
    GPT-NeoX's, Falcon's and GPT-J's names for attention."""
    return _child(block, "self_attn", "linear_attn", "attention", "self_attention", "attn")


def _mlp(block: nn.Module) -> nn.Module | None:
    """The block's MLP (or Mixture-of-Experts) module: `mlp`, `feed_forward` (Llama 4) or `ffn` (MPT)."""
    return _child(block, "mlp", "feed_forward", "ffn")


def _zero_residual(module: nn.Module) -> dict:
    """Bloom's attention and MLP and MPT's MLP add the residual themselves, from an argument: given a zero one,
    they return their branch alone, and the half adds the residual as in every other family."""
    return {"residual": 0.0} if "residual" in inspect.signature(module.forward).parameters else {}


class LlamaAdapter(Adapter):
    # Llama, Mistral, Qwen2/3, Gemma 2/3, OLMo 2, Phi-3/4, GLM, DeepSeek-V2/3, MoE variants, and the parallel
    # blocks of GPT-NeoX, Phi-1/2, Falcon, GPT-J, Cohere, ...
    family = "llama"
    expects = ("self_attn (or attention, self_attention, attn).{q,k,v,o}_proj (or qkv_proj, o_proj; query_key_value, "
               "dense; q/k/v_proj with dense or out_proj; latent attention's q_a/q_b/kv_a/kv_b_proj) and "
               "mlp (or feed_forward).{gate,up,down}_proj (or gate_up_proj, down_proj; up_proj, down_proj; c_fc, "
               "c_proj; fc1, fc2; dense_h_to_4h, dense_4h_to_h; fc_in, fc_out; or experts)")

    @classmethod
    def matches(cls, block):
        attn, mlp = _mixer(block), _mlp(block)
        return layout(attn, ATTENTION_LAYOUTS) is not None and (layout(mlp, MLP_LAYOUTS) is not None or _is_moe(mlp))

    def halves(self, block):
        # Where each branch is normalised: before it (Llama), before and after it (Gemma's "sandwich"), or
        # only after it (OLMo 2, which has no input norm): the output norm is part of the half.
        attn_in, attn_out, mlp_in, mlp_out = self.branch_norms(block)
        parallel = self.parallel(block, attn_in, mlp_in)
        scale = getattr(block, "residual_multiplier", 1.0)  # Granite scales each branch before the residual add
        mixer, feed_forward = _mixer(block), _mlp(block)
        attn_zero, mlp_zero = _zero_residual(mixer), _zero_residual(feed_forward)
        attention = Half(
            "attention",
            (mixer,),
            run=lambda h, kw: first_output(mixer(hidden_states=attn_in(h), **kw, **attn_zero)),
            finish=lambda h, y: torch.add(h, attn_out(y), alpha=scale),
            writer=_linear_of(getattr(mixer, layout(mixer, ATTENTION_LAYOUTS)[-1])),
            norms=(attn_in, attn_out),
            output_norm=None if isinstance(attn_out, nn.Identity) else attn_out,
            reads_raw_stream=isinstance(attn_in, nn.Identity),
            deferred=parallel,
        )
        mlp = Half(
            "mlp",
            (feed_forward,),
            # (some MoE blocks also return router logits)
            run=lambda h, kw: first_output(feed_forward(mlp_in(h), **mlp_zero)),
            finish=lambda h, y: torch.add(h, mlp_out(y.reshape(h.shape)), alpha=scale),  # Llama 4's: [tokens, H]
            writer=None if _is_moe(feed_forward) else _linear_of(getattr(feed_forward, layout(feed_forward,
                                                                                         MLP_LAYOUTS)[-1])),
            norms=tuple(n for n in (mlp_in, mlp_out) if n is not attn_in),  # one norm for both branches: attention's
            output_norm=None if isinstance(mlp_out, nn.Identity) else mlp_out,
            reads_raw_stream=isinstance(mlp_in, nn.Identity),
            beside=attention if parallel else None,
        )
        return attention, mlp

    @staticmethod
    def parallel(block, attn_in: nn.Module, mlp_in: nn.Module) -> bool:
        """Whether attention and MLP read the same input side by side (`attn_in`, `mlp_in`: their norms, from
        `branch_norms`): one norm for both (Cohere, Phi-1/2, GPT-J, Falcon-7B), a norm each but no residual add
        between them (Falcon-40B's ln_attn/ln_mlp), or a flag (GPT-NeoX and StableLM's use_parallel_residual)."""
        return (mlp_in is attn_in and not isinstance(attn_in, nn.Identity)) or _has(block, "ln_attn", "ln_mlp") \
            or bool(getattr(block, "use_parallel_residual", False))

    @staticmethod
    def branch_norms(block) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
        """(attention in, attention out, MLP in, MLP out); nn.Identity where a block has no such norm."""
        none = nn.Identity()
        if _has(block, "pre_feedforward_layernorm", "post_feedforward_layernorm"):  # Gemma 2/3
            return (block.input_layernorm, block.post_attention_layernorm, block.pre_feedforward_layernorm,
                    block.post_feedforward_layernorm)
        if _has(block, "attention_layernorm", "feedforward_layernorm"):  # Apertus: Llama's norms, named otherwise
            return block.attention_layernorm, none, block.feedforward_layernorm, none
        if _has(block, "post_self_attn_layernorm", "post_mlp_layernorm"):  # GLM-4's sandwich, named otherwise
            return (block.input_layernorm, block.post_self_attn_layernorm, block.post_attention_layernorm,
                    block.post_mlp_layernorm)
        if not hasattr(block, "input_layernorm") and _has(block, "post_feedforward_layernorm"):  # OLMo 2
            return none, block.post_attention_layernorm, none, block.post_feedforward_layernorm
        if _has(block, "ln_attn", "ln_mlp"):  # Falcon-40B/180B: a norm for each of its parallel branches
            return block.ln_attn, none, block.ln_mlp, none
        first = _child(block, "input_layernorm", "ln_1", "norm_1")
        second = _child(block, "post_attention_layernorm", "pre_feedforward_layernorm", "ln_2", "norm_2")
        if first is None:
            raise PrunelabError(f"{type(block).__name__} has no norm this adapter knows before its attention "
                                f"(children: {', '.join(n for n, _ in block.named_children())})")
        # one norm only: both branches read it (Cohere, Phi-1/2, GPT-J)
        return first, none, (first if second is None else second), none

    def residual_sources(self):
        normed = _child(self.stack, "word_embeddings_layernorm")  # Bloom normalises the embeddings: that is the source
        if normed is not None:
            return [normed]
        tokens = self.model.get_input_embeddings()  # and learned positions beside it (GPTBigCode's wpe)
        return [tokens, *(m for m in self.stack.children() if isinstance(m, nn.Embedding) and m is not tokens)]

    def final_norm(self):
        # Llama; Phi-1/2; GPT-NeoX; Falcon, Bloom, GPT-J, GPTBigCode; MPT
        return _child(self.stack, "norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f")

    def widths(self, block):
        attn, mlp = _mixer(block), _mlp(block)
        if _is_moe(mlp):
            raise PrunelabError(
                f"width pruning needs a dense MLP; {type(block).__name__} routes tokens to experts "
                "(Mixture-of-Experts is not supported)"
            )
        attention = _attention_width(block, attn)
        mlp_width = _mlp_width(block, mlp)
        _refuse_inner_weights(attn, attention.linear(attention.writer).in_features, "attention heads")
        _refuse_inner_weights(mlp, mlp_width.linear(mlp_width.writer).in_features, "MLP channels")
        return attention, mlp_width

    def recount(self, block):
        attn = _mixer(block)
        names = layout(attn, ATTENTION_LAYOUTS)
        if _fused_order(attn, names) is None:  # separate projections (most split by the head size alone)
            if _has(attn, "q_proj", "k_proj") and isinstance(getattr(attn, "head_dim", None), int):
                _set_head_counts(attn, getattr(attn, names[-1]).in_features // attn.head_dim,
                                 attn.k_proj.out_features // attn.head_dim)
            return
        queries, kv_heads = _fused_heads(attn, names)
        _set_head_counts(attn, queries, kv_heads)
        if isinstance(getattr(attn, "split_size", None), int):  # GPT-2 splits its thirds there
            attn.split_size = getattr(attn, names[-1]).in_features
        if names[0] == "c_attn" and isinstance(getattr(attn, "embed_dim", None), int):  # GPTBigCode's multi-query
            attn.embed_dim = getattr(attn, names[-1]).in_features  # split (GPT-2 reads it nowhere after __init__)
        if names[0] == "qkv_proj":  # Phi-3 splits at its config's head counts: a narrowed layer gets its own config
            counts = {"num_attention_heads": queries, "num_key_value_heads": kv_heads}
            shared = self.model.config.get_text_config()
            if all(getattr(shared, k) == v for k, v in counts.items()):
                attn.config = shared
            elif any(getattr(attn.config, k) != v for k, v in counts.items()):
                attn.config = copy.copy(shared)
                for key, value in counts.items():
                    setattr(attn.config, key, value)

    def channels(self, block):
        with self.prunable_linears(block):  # fused experts as the per-expert views the pass prunes, and names
            mlp = _mlp(block)
            found = [_mlp_channels(block, mlp), _value_channels(block, _mixer(block)), *_expert_channels(block, mlp)]
        return {c.writer: c for c in found if c is not None}


def _set_head_counts(attn: nn.Module, queries: int, kv_heads: int) -> None:
    """Set the head counts an attention's forward may split by to those of its (narrowed) shapes: each of the
    count attributes it holds (StableLM's and OPT's `num_heads`, Falcon's `num_kv_heads`, `num_key_value_groups`
    of every multi-query attention)."""
    for count, value in (("num_heads", queries), ("num_attention_heads", queries), ("n_head", queries),
                         ("num_kv_heads", kv_heads), ("num_key_value_heads", kv_heads),
                         ("num_key_value_groups", queries // max(kv_heads, 1))):
        if isinstance(getattr(attn, count, None), int):
            setattr(attn, count, value)


def _attention_width(block: nn.Module, attn: nn.Module) -> Width:
    """Attention's units for width pruning: a KV group (a KV head with its query heads), so that every layer keeps
    the GQA ratio, from separate q/k/v projections or a fused one in an order known here (`_fused_order`)."""
    names = layout(attn, ATTENTION_LAYOUTS)
    path = next(n for n, m in block.named_children() if m is attn)
    if "kv_b_proj" in names:
        raise PrunelabError(f"width pruning removes attention heads, but {type(attn).__name__} computes keys and "
                            "values from a shared latent (multi-head latent attention); not supported yet")
    wrapped = [n for n in names if not isinstance(getattr(attn, n), nn.Linear)]
    if wrapped:  # Moshi's: the narrowed linear would replace its wrapper, whose forward the attention calls
        raise PrunelabError(f"width pruning narrows linear layers; {type(attn).__name__}.{wrapped[0]} is a "
                            f"{type(getattr(attn, wrapped[0])).__name__}; not supported yet")
    writer = names[-1]  # o_proj, or dense (Phi-1/2, GPT-NeoX), out_proj (GPT-J) or c_proj (GPT-2)
    order = _fused_order(attn, names)
    if order is not None:
        return _fused_width(path, attn, names, order)
    if names[:3] != ("q_proj", "k_proj", "v_proj") or len(names) != 4:  # other fused orders, linear attention
        raise PrunelabError(f"width pruning removes attention heads from separate q/k/v projections or a fused "
                            f"one in an order known here; {type(attn).__name__} ({', '.join(names)}) has neither; "
                            "not supported yet")
    head_dim = attn.head_dim
    spanning = [n for n in ("q_norm", "k_norm") if getattr(getattr(attn, n, None), "weight", torch.ones(0)).numel()
                not in (0, head_dim)]
    if spanning:  # OLMo 2: its RMS runs over all heads at once, so removing a head changes the others
        raise PrunelabError(f"width pruning removes attention heads, but {type(attn).__name__}.{spanning[0]} "
                            f"normalises across all heads; this family is not supported yet")
    kv_heads = attn.k_proj.out_features // head_dim
    per_group = getattr(attn, writer).in_features // head_dim // kv_heads
    if kv_heads == 1 and per_group > 1:  # multi-query (Gemma 1 2B, Gemma 3 270M and 1B): the query heads are the
        queries = _heads(per_group, 1, head_dim)  # units, the one key and value head stays
        return Width("attention", "query head", path, attn, writer, {"q_proj": queries}, queries)
    groups, kv = _heads(kv_heads, per_group, head_dim), _heads(kv_heads, 1, head_dim)
    return Width("attention", "kv group", path, attn, writer, {"q_proj": groups, "k_proj": kv, "v_proj": kv}, groups)


def _heads(units: int, per_unit: int, head_dim: int) -> list[list[int]]:
    """The channels of `units` runs of `per_unit` consecutive heads each (a KV group's query heads, one head)."""
    width = per_unit * head_dim
    return [list(range(u * width, (u + 1) * width)) for u in range(units)]


def _fused_width(path: str, attn: nn.Module, names: tuple[str, ...], order: str) -> Width:
    """KV groups of a fused q/k/v projection (single heads where each has its own key and value): group g owns
    its query heads' rows and its key and value head's rows where `order` puts them; the writer's columns are its
    query heads'."""
    queries, kv_heads = _fused_heads(attn, names)
    head_dim = getattr(attn, names[-1]).in_features // queries
    per_group = queries // kv_heads
    if kv_heads == 1 and queries > 1:  # multi-query (Falcon-7B, StarCoder 1): the query heads are the units, and
        heads = _heads(queries, 1, head_dim)  # in either order their rows come first
        return Width("attention", "query head", path, attn, names[-1], {names[0]: heads}, heads,
                     shared={names[0]: list(range(queries * head_dim, (queries + 2) * head_dim))})
    groups = _heads(kv_heads, per_group, head_dim)
    if order == "parts":  # every query row, then the key rows, then the value rows
        rows = [q + [queries * head_dim + (part * kv_heads + g) * head_dim + c for part in range(2)
                     for c in range(head_dim)] for g, q in enumerate(groups)]
    else:  # "groups": a group's query heads, its key head and its value head, then the next group's
        span = (per_group + 2) * head_dim
        rows = [list(range(g * span, (g + 1) * span)) for g in range(kv_heads)]
    return Width("attention", "head" if per_group == 1 else "kv group", path, attn, names[-1], {names[0]: rows},
                 groups)


def _fused_heads(attn: nn.Module, names: tuple[str, ...]) -> tuple[int, int]:
    """(query heads, key-value heads) of a fused q/k/v projection, from its shapes and the head size: the writer
    reads the query heads' outputs; the projection adds a key and a value row block per key-value head."""
    fused, writer = getattr(attn, names[0]), getattr(attn, names[-1])
    head_dim = getattr(attn, "head_dim", getattr(attn, "head_size", None))
    extra = fused.out_features - writer.in_features
    if not isinstance(head_dim, int) or head_dim <= 0 or writer.in_features % head_dim or extra <= 0 or \
            extra % (2 * head_dim) or (writer.in_features // head_dim) % (extra // (2 * head_dim)):
        raise PrunelabError(f"width pruning removes attention heads, but {type(attn).__name__}.{names[0]} has "
                            f"{fused.out_features} rows, which its {writer.in_features} query channels and a head "
                            f"size of {head_dim} do not divide into query, key and value heads")
    return writer.in_features // head_dim, extra // (2 * head_dim)


def _fused_order(attn: nn.Module | None, names: tuple[str, ...] | None) -> str | None:
    """How a fused q/k/v projection lays out its rows: "parts" (every query row, then the key rows, then the
    value rows: GPT-2's held Conv1D `c_attn`, split at `split_size`; Phi-3's `qkv_proj`, split at its config's
    head counts) or "groups" (a group's query heads, then its key and value head, group after group: GPT-NeoX's
    and Falcon's `query_key_value`, GPTBigCode's `c_attn`; one head after another where each has its own). These
    are rules read off the module tree; `structured.check_width` proves them on the model before any work, and a
    family whose forward does not follow them (Bloom's and Falcon-RW's ALiBi slopes count the heads of the model,
    not of the layer) is refused there. None for separate projections and fused ones these rules do not know."""
    if names is None or len(names) != 2 or not isinstance(getattr(attn, names[0]), nn.Linear):
        return None
    if names == ("qkv_proj", "o_proj") and isinstance(getattr(attn, "num_key_value_heads", None), int) and \
            hasattr(getattr(attn, "config", None), "num_attention_heads"):
        return "parts"
    if names[0] == "c_attn" and isinstance(getattr(attn, names[0]), HeldConv1D):
        return "parts"
    if names[0] in ("query_key_value", "c_attn"):
        return "groups"
    return None


def _refuse_inner_weights(module: nn.Module, inner: int, units: str) -> None:
    """Width pruning slices the projections alone: a module beside them with a weight per inner channel
    (BitNet's sub-norms over the MLP's and the attention's inner width) would keep the removed channels, and
    a norm across them would change what the kept ones compute."""
    for name, child in module.named_children():
        weight = getattr(child, "weight", None)
        if not isinstance(child, nn.Linear) and isinstance(weight, torch.Tensor) and weight.dim() == 1 \
                and weight.numel() == inner:
            raise PrunelabError(f"width pruning removes {units}, but {type(module).__name__}.{name} holds a weight "
                                "for every one of them; this family is not supported yet")


def _linear_of(projection: nn.Module) -> nn.Module:
    """The linear layer a projection is: itself, or the one linear inside a wrapper around it (Moshi's
    `MoshiLinear`); anything else is returned as it is, and refused where a linear is needed."""
    if isinstance(projection, nn.Linear):
        return projection
    inner = [m for m in projection.modules() if isinstance(m, nn.Linear)]
    return inner[0] if len(inner) == 1 and sum(p.numel() for p in projection.parameters()) == \
        sum(p.numel() for p in inner[0].parameters()) else projection


def _name_in(block: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in block.named_modules() if m is module)


def _mlp_width(block: nn.Module, mlp: nn.Module) -> Width:
    """A dense MLP's hidden channels, one unit each: act(gate) · up, or act(up); fused gate_up: two rows."""
    *reader_names, writer = layout(mlp, MLP_LAYOUTS)
    inner = getattr(mlp, writer).in_features
    channels = [[c] for c in range(inner)]
    readers = ({"gate_up_proj": [[c, inner + c] for c in range(inner)]} if reader_names == ["gate_up_proj"]
               else {name: channels for name in reader_names})
    return Width("mlp", "channel", _name_in(block, mlp), mlp, writer, readers, channels)


def _mlp_channels(block: nn.Module, mlp: nn.Module | None) -> Channels | None:
    """The units of `_mlp_width` as one pool, for a dense MLP (a shared expert, an expert of a list too)."""
    if layout(mlp, MLP_LAYOUTS) is None or _is_moe(mlp) or isinstance(mlp, UnfusedExperts):
        return None
    width = _mlp_width(block, mlp)
    rows = {name: torch.tensor(units).T.unsqueeze(0) for name, units in width.readers.items()}  # [1, copies, inner]
    if any(width.linear(name).out_features != r.numel() for name, r in rows.items()):
        return None
    return Channels(f"{width.path}.{width.writer}", torch.tensor(width.units).T.unsqueeze(0),
                    {f"{width.path}.{name}": r for name, r in rows.items()},
                    unit=functools.partial(mlp, **_zero_residual(mlp)))  # Bloom's and MPT's take the residual


def _expert_channels(block: nn.Module, moe: nn.Module | None) -> list[Channels]:
    """Within a Mixture-of-Experts module: each expert's hidden channels (fused experts through their per-expert
    views, where their gate layout is known) and those of its shared experts."""
    if not _is_moe(moe):
        return []
    found = []
    for module in moe.modules():
        if isinstance(module, UnfusedExperts):
            found += module.channels(_name_in(block, module))
        elif module is not moe:
            found.append(_mlp_channels(block, module))
    return found


def _value_channels(block: nn.Module, attn: nn.Module | None) -> Channels | None:
    """Attention's value dimensions, one pool per value head: dimension d of value head g feeds column d of
    every query head of its group; queries and keys stay as they are (rotary embeddings pair their dimensions).
    Separate q/k/v projections of plain (grouped) multi-head attention only."""
    names = layout(attn, ATTENTION_LAYOUTS)
    if names is None or names[:3] != ("q_proj", "k_proj", "v_proj") or len(names) != 4 or \
            not all(isinstance(getattr(attn, n), nn.Linear) for n in names):  # (Moshi wraps its projections)
        return None
    head_dim = getattr(attn, "head_dim", None)
    if not isinstance(head_dim, int) or head_dim <= 0 or isinstance(getattr(attn, "v_norm", None), nn.Module):
        return None
    writer = getattr(attn, names[-1])
    heads, kv_heads = divmod(writer.in_features, head_dim), divmod(attn.v_proj.out_features, head_dim)
    if heads[1] or kv_heads[1] or heads[0] % kv_heads[0] or attn.q_proj.out_features != writer.in_features:
        return None  # a gate in q_proj's rows (Qwen3-Next), a value head size of its own (latent attention)
    per_group = heads[0] // kv_heads[0]
    prefix = _name_in(block, attn)
    return Channels(f"{prefix}.{names[-1]}", _runs(kv_heads[0], per_group, head_dim),
                    {f"{prefix}.v_proj": _runs(kv_heads[0], 1, head_dim)})


class OPTAdapter(Adapter):
    family = "opt"  # OPT, BioGPT
    expects = "self_attn.{q,k,v,out}_proj and fc1, fc2"

    @classmethod
    def matches(cls, block):
        return _has(getattr(block, "self_attn", None), "q_proj", "k_proj", "v_proj", "out_proj") and _has(
            block, "fc1", "fc2"
        )

    def halves(self, block):
        pre = getattr(block, "do_layer_norm_before", True)  # OPT-350m normalises after the residual add instead

        def residual(norm):
            return (lambda h, y: h + y) if pre else (lambda h, y: norm(h + y))

        attention = Half(
            "attention",
            (block.self_attn,),
            run=lambda h, kw: first_output(
                block.self_attn(hidden_states=block.self_attn_layer_norm(h) if pre else h, **kw)
            ),
            finish=residual(block.self_attn_layer_norm),
            writer=block.self_attn.out_proj,
            norms=(block.self_attn_layer_norm,),
        )
        mlp = Half(
            "mlp",
            (block.fc1, block.fc2),
            run=lambda h, kw: block.fc2(block.activation_fn(block.fc1(block.final_layer_norm(h) if pre else h))),
            finish=residual(block.final_layer_norm),
            writer=block.fc2,
            norms=(block.final_layer_norm,),
        )
        return attention, mlp

    def channels(self, block):
        mlp = _runs(1, 1, block.fc2.in_features)
        attn = block.self_attn
        found = {"fc2": Channels("fc2", mlp, {"fc1": mlp})}
        head_dim = getattr(attn, "head_dim", None)
        if isinstance(head_dim, int) and head_dim > 0 and attn.out_proj.in_features % head_dim == 0:
            heads = attn.out_proj.in_features // head_dim
            found["self_attn.out_proj"] = Channels("self_attn.out_proj", _runs(heads, 1, head_dim),
                                                   {"self_attn.v_proj": _runs(heads, 1, head_dim)})
        return found

    def widths(self, block):
        # OPT has no grouped keys and values: a unit of attention is one head, its q, k and v rows together
        attn = block.self_attn
        heads = _heads(attn.out_proj.in_features // attn.head_dim, 1, attn.head_dim)
        channels = [[c] for c in range(block.fc2.in_features)]
        return (Width("attention", "head", "self_attn", attn, "out_proj",
                      {"q_proj": heads, "k_proj": heads, "v_proj": heads}, heads),
                Width("mlp", "channel", "", block, "fc2", {"fc1": channels}, channels))

    def recount(self, block):
        attn = block.self_attn  # OPT's forward splits its heads by num_heads (BioGPT's by the head size), XGLM's
        _set_head_counts(attn, *(attn.q_proj.out_features // attn.head_dim,) * 2)  # merges them into embed_dim
        if isinstance(getattr(attn, "embed_dim", None), int):
            attn.embed_dim = attn.out_proj.in_features

    def residual_writers(self, block):
        if not getattr(block, "do_layer_norm_before", True):
            raise PrunelabError(
                "this OPT model normalises the residual stream after every block (post-LN): "
                "there is no residual magnitude to compensate"
            )
        return super().residual_writers(block)

    def residual_sources(self):
        decoder = self.stack
        tokens = decoder.project_in if getattr(decoder, "project_in", None) is not None else decoder.embed_tokens
        if not isinstance(getattr(decoder.embed_positions, "weight", None), torch.Tensor):
            raise PrunelabError(f"{type(decoder.embed_positions).__name__} computes the positions it adds to the "
                                "residual stream (XGLM's sinusoids): there is no weight to fold magnitude "
                                "compensation into (--no-compensation)")
        return [tokens, decoder.embed_positions]

    def final_norm(self):
        return getattr(self.stack, "final_layer_norm", getattr(self.stack, "layer_norm", None))  # BioGPT: layer_norm


ADAPTERS: tuple[type[Adapter], ...] = (LlamaAdapter, OPTAdapter)


def find_adapter(model: nn.Module) -> Adapter:
    block = find_block_list(model)[0]
    for adapter_cls in ADAPTERS:
        if adapter_cls.matches(block):
            return adapter_cls(model)
    looked_for = "; ".join(f"{a.family}: {a.expects}" for a in ADAPTERS)
    children = ", ".join(name for name, _ in block.named_children())
    raise PrunelabError(
        f"unsupported architecture: block {type(block).__name__} has children [{children}], "
        f"expected one of ({looked_for})"
    )


# --- Mixture-of-Experts -------------------------------------------------------------------------


def _is_moe(module: nn.Module | None) -> bool:
    return module is not None and isinstance(getattr(module, "experts", None), nn.Module)


def _routers(block: nn.Module) -> set[int]:
    """ids of routing linears: the direct linear children of a Mixture-of-Experts module."""
    return {id(child) for m in block.modules() if _is_moe(m) for child in m.children() if isinstance(child, nn.Linear)}


def _is_fused_experts(module: nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == 3


class UnfusedExperts(nn.Module):
    """Per-expert linear views of fused expert tensors: `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I], or
    stored transposed, [E, H, 2I] and [E, I, H] (Llama 4, GPT-OSS), told apart by which shapes fit together;
    with their biases where the module has them (GPT-OSS).

    `gate_proj` and `up_proj` view each expert's gate rows and up rows: the first and second half of its
    gate_up rows, or the even and odd ones where the module's own gate function (`_apply_gate`, where
    transformers gives it one) interleaves them (GPT-OSS), which `_gate_layout` tells by trying it. They are put
    back in the module's layout for its gate function, so the views compute exactly as the module does. A gate
    function of neither layout gets the two halves, each row still one output of the projection, which is all a
    pruning criterion sees; only the channels to reorder (`channels`) need to know which rows pair up.

    Runs the reference (eager) loop over the experts, so hooks on the per-expert linears see exactly the
    tokens routed to each expert. Most MoE modules call their experts with the routing (`top_k_index`,
    `top_k_weights`); Llama 4's calls them with every token for every expert, each scaled by its router
    score, zero where the expert was not chosen, and sums the outputs.
    """

    def __init__(self, fused: nn.Module):
        super().__init__()
        gate_up, down = fused.gate_up_proj, fused.down_proj
        up_bias, down_bias = getattr(fused, "gate_up_proj_bias", None), getattr(fused, "down_proj_bias", None)
        experts = gate_up.shape[0]
        transposed = gate_up.shape[2] == 2 * down.shape[1] and gate_up.shape[1] == down.shape[2]
        if not (transposed or (gate_up.shape[1] == 2 * down.shape[2] and gate_up.shape[2] == down.shape[1])) \
                or down.shape[0] != experts or (getattr(fused, "has_bias", False) and up_bias is None):
            raise PrunelabError(
                f"unsupported fused expert layout in {type(fused).__name__}: "
                f"gate_up_proj {tuple(gate_up.shape)}, down_proj {tuple(down.shape)}"
            )
        inter = down.shape[1] if transposed else down.shape[2]
        self.num_experts, self.inter = experts, inter
        self.gate = _gate_function(fused, torch.zeros(1, 2 * inter, dtype=gate_up.dtype, device=gate_up.device))
        self.layout = _gate_layout(self.gate, inter)

        def view(weight: torch.Tensor, bias: nn.Parameter | None, e: int, rows=slice(None)) -> nn.Linear:
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
            # shares storage with `fused`; `.data`: a version counter of its own, so that an expert's weights
            # stepped in place inside a backward pass do not look modified to the other experts' (loop.fit)
            linear.weight = nn.Parameter(weight.data, requires_grad=False)
            if bias is not None:
                linear.bias = nn.Parameter(bias.data[e, rows], requires_grad=False)
            return linear

        up, dn = (gate_up.data.transpose(1, 2), down.data.transpose(1, 2)) if transposed else (gate_up.data, down.data)
        first, second = _gate_rows(self.layout or "halves", inter)
        self.gate_proj = nn.ModuleList(view(up[e, first], up_bias, e, first) for e in range(experts))
        self.up_proj = nn.ModuleList(view(up[e, second], up_bias, e, second) for e in range(experts))
        self.down_proj = nn.ModuleList(view(dn[e], down_bias, e) for e in range(experts))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj[e](x), self.up_proj[e](x)
        gate_up = torch.stack((gate, up), -1).flatten(-2) if self.layout == "interleaved" else torch.cat((gate, up), -1)
        return self.down_proj[e](self.gate(gate_up))

    def channels(self, prefix: str) -> list[Channels]:
        """Each expert's hidden channels (`prefix`: this module's name in the block), where the gate layout is
        known: channel c is down's column c with row c of the gate and the up view."""
        if self.layout is None:
            return []
        index = _runs(1, 1, self.inter)
        return [Channels(f"{prefix}.down_proj.{e}", index, {f"{prefix}.gate_proj.{e}": index,
                                                            f"{prefix}.up_proj.{e}": index},
                         unit=functools.partial(self.expert, e))
                for e in range(self.num_experts)]

    def forward(self, hidden_states, top_k_index=None, top_k_weights=None):
        if top_k_index is None:  # Llama 4: [E * tokens, H], expert e's block zero where it was not chosen
            per_expert = hidden_states.view(self.num_experts, -1, hidden_states.shape[-1])
            out = torch.zeros_like(per_expert)
            for e in range(self.num_experts):
                (rows,) = torch.where(per_expert[e].ne(0).any(-1))  # a zero row gives zero: no biases
                if len(rows):
                    out[e, rows] = self.expert(e, per_expert[e, rows]).to(out.dtype)
            return out.view(-1, hidden_states.shape[-1])
        out = torch.zeros_like(hidden_states)
        for expert in top_k_index.unique().tolist():
            if not 0 <= expert < self.num_experts:
                continue
            token_idx, k_pos = torch.where(top_k_index == expert)
            h = self.expert(expert, hidden_states[token_idx])
            out.index_add_(0, token_idx, (h * top_k_weights[token_idx, k_pos, None]).to(out.dtype))
        return out


def _gate_function(fused: nn.Module, probe: torch.Tensor):
    """[..., 2I] gate_up outputs → [..., I]: the module's own `_apply_gate`, or act(gate) · up; tried on `probe`
    ([1, 2I], on the experts' device) so that a module whose gate cannot run is refused here, in one line."""
    apply, act, inter = getattr(fused, "_apply_gate", None), getattr(fused, "act_fn", None), probe.shape[-1] // 2
    gate = apply if callable(apply) else (lambda y: act(y[..., :inter]) * y[..., inter:]) if callable(act) else None
    try:
        if gate is None or gate(probe).shape != (1, inter):
            raise ValueError("no gate function")
    except Exception as exc:  # any failure of a foreign module's gate means we cannot run it
        raise PrunelabError(f"unsupported fused expert layout in {type(fused).__name__}: its gate does not run "
                            f"({exc})") from None
    return gate


def _gate_rows(layout: str, inter: int) -> tuple[slice, slice]:
    """Which of an expert's 2·inter gate_up rows are its gate rows and its up rows, channel by channel."""
    return (slice(0, None, 2), slice(1, None, 2)) if layout == "interleaved" else (slice(inter), slice(inter, None))


def _gate_layout(gate, inter: int) -> str | None:
    """"halves" or "interleaved" (`_gate_rows`): the one the gate function reads, found by trying it. Moving the
    channels of a random input in its gate and up rows alike must move the output's channels the same way."""
    g = torch.Generator().manual_seed(0)
    y, order = torch.randn(4, 2 * inter, generator=g), torch.randperm(inter, generator=g)
    for name in ("halves", "interleaved"):
        moved = y.clone()
        for part in _gate_rows(name, inter):
            moved[:, part] = y[:, part][:, order]
        try:
            if torch.allclose(gate(moved), gate(y)[:, order]):
                return name
        except Exception:  # a foreign gate function that cannot run on a CPU probe: no layout known
            return None
    return None


def _unfuse_experts(block: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    swapped = []
    for parent in list(block.modules()):
        for name, child in list(parent.named_children()):
            if _is_fused_experts(child):
                setattr(parent, name, UnfusedExperts(child))
                swapped.append((parent, name, child))
    return swapped
