"""Tiny random models of each supported family, built from configs (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from prunelab.models.conv1d import hold

VOCAB = 256

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)

CONFIGS = {
    "llama": ("LlamaConfig", dict(_COMMON, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(_COMMON, sliding_window=8)),
    "qwen2": ("Qwen2Config", dict(_COMMON)),
    "qwen3": ("Qwen3Config", dict(_COMMON, head_dim=16)),
    "gemma3": ("Gemma3TextConfig", dict(_COMMON, head_dim=16, sliding_window=8,
                                         layer_types=["sliding_attention", "full_attention"])),
    "olmo2": ("Olmo2Config", dict(_COMMON, pad_token_id=0)),  # norms after each branch only, q/k norms over all heads
    "phi3": ("Phi3Config", dict(_COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2)),  # fused qkv and gate_up
    "glm4": ("Glm4Config", dict(_COMMON, head_dim=16, pad_token_id=0)),  # norms after each branch too, fused gate_up
    "starcoder2": ("Starcoder2Config", dict(_COMMON)),  # an MLP without a gate (c_fc, c_proj), biases everywhere
    # attention and MLP side by side (parallel residual): a norm each, fused q/k/v (GPT-NeoX, Pythia) ...
    "gpt_neox": ("GPTNeoXConfig", dict(_COMMON, rotary_pct=0.25, pad_token_id=0)),
    # ... one norm for both, the writer called `dense` (Phi-1/2) ...
    "phi": ("PhiConfig", dict(_COMMON, pad_token_id=0)),
    # ... a norm each, ln_attn and ln_mlp, one key/value head per group (Falcon-40B/180B)
    "falcon": ("FalconConfig", dict(_COMMON, new_decoder_architecture=True, num_kv_heads=2, pad_token_id=0)),
    # fused c_attn with one key/value head, learned positions, blocks called with positional arguments
    "gpt_bigcode": ("GPTBigCodeConfig", dict(vocab_size=VOCAB, n_embd=64, n_head=4, n_positions=1024,
                                              bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    # GPT-2: Conv1D layers (weights stored [in, out]), held as linears; fused c_attn, learned positions
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=64, n_head=4, n_positions=1024, bos_token_id=1,
                                eos_token_id=2, pad_token_id=0)),
    # attention and MLP that add the residual themselves, alibi, a norm on the embeddings (SparseGPT's BLOOM)
    "bloom": ("BloomConfig", dict(vocab_size=VOCAB, hidden_size=64, n_head=4, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2)),
    "opt": ("OPTConfig", dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=1024, word_embed_proj_dim=64)),
    "biogpt": ("BioGptConfig", dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=1024)),  # OPT's block, scaled input
    "qwen2_moe": ("Qwen2MoeConfig", dict(_COMMON, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                         num_experts=4, num_experts_per_tok=2)),
    "mixtral": ("MixtralConfig", dict(_COMMON, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(_COMMON, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)),
    # feed_forward: a dense first block, then 4 experts stored transposed, each token scaled by its router score
    "llama4": ("Llama4TextConfig", dict(_COMMON, head_dim=16, intermediate_size=32, intermediate_size_mlp=128,
                                        num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
                                        attention_chunk_size=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # experts stored transposed, with biases, gate and up rows interleaved, a clamped SwiGLU; attention sinks
    "gpt_oss": ("GptOssConfig", dict(_COMMON, head_dim=16, intermediate_size=32, num_local_experts=4,
                                     num_experts_per_tok=2, sliding_window=8, pad_token_id=0, bos_token_id=1,
                                     eos_token_id=2, layer_types=["sliding_attention", "full_attention"])),
    # a hybrid: linear attention (Gated DeltaNet, `linear_attn`) and full attention in turn, routed experts
    "qwen3_next": ("Qwen3NextConfig", dict(_COMMON, head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2,
                                           linear_key_head_dim=16, linear_value_head_dim=16, num_experts=4,
                                           num_experts_per_tok=2, moe_intermediate_size=32,
                                           shared_expert_intermediate_size=32, pad_token_id=0,
                                           layer_types=["linear_attention", "full_attention"])),
    # multi-head latent attention (q_a/q_b, kv_a/kv_b), a dense first block, then routed and shared experts
    "deepseek_v3": ("DeepseekV3Config", dict(_COMMON, moe_intermediate_size=32, n_routed_experts=4,
                                             num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                                             q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                             v_head_dim=16, pad_token_id=0)),
}
FAMILIES = list(CONFIGS)


def tiny_model(family: str = "llama", seed: int = 0, layers: int = 2, **overrides) -> torch.nn.Module:
    import transformers

    class_name, kwargs = CONFIGS[family]
    kwargs = dict(kwargs, num_hidden_layers=layers, **overrides)
    if "layer_types" in kwargs:
        kwargs["layer_types"] = [kwargs["layer_types"][i % 2] for i in range(layers)]
    config = getattr(transformers, class_name)(**kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.use_cache = False
    hold(model)  # as `load_model` hands a model over: GPT-2's Conv1D layers as linears
    return model.eval()


def as_loaded_in_bfloat16(model: torch.nn.Module) -> torch.nn.Module:
    """`model` in bfloat16 as `from_pretrained(..., dtype=torch.bfloat16)` holds it: what its class keeps in float32
    (`_keep_in_fp32_modules_strict`: DeepSeek-V3's router) stays float32."""
    model.to(torch.bfloat16)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if any(f".{kept}" in f".{name}" for kept in model._keep_in_fp32_modules_strict or ()):
            tensor.data = tensor.data.float()
    return model


def random_ids(samples: int = 8, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (samples, seqlen), generator=torch.Generator().manual_seed(seed))


def quantized_checkpoint(folder: Path, state: dict, quantization_config: dict) -> Path:
    """`folder`'s checkpoint rewritten with `state` as its weights and `quantization_config` in its config."""
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    return folder


def mxfp4_checkpoint(folder: Path, tokenizer) -> Path:
    """A tiny GPT-OSS whose experts are stored as on the hub: MXFP4, 32 four-bit codes (random here) per 8-bit
    power-of-two scale."""
    tiny_model("gpt_oss").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    generator = torch.Generator().manual_seed(1)
    for name in [k for k in state if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, inputs, outputs = state.pop(name).shape  # held [E, in, out]; stored [E, out, in / 32, 16 bytes]
        state[f"{name}_blocks"] = torch.randint(0, 256, (experts, outputs, inputs // 32, 16), generator=generator,
                                                dtype=torch.uint8)
        state[f"{name}_scales"] = torch.randint(118, 124, (experts, outputs, inputs // 32), generator=generator,
                                                dtype=torch.uint8)  # 2^-9 ... 2^-4
    return quantized_checkpoint(folder, state, {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]})
