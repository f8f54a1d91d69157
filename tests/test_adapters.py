import pytest
import torch
from tiny import FAMILIES, tiny_model
from torch import nn
from transformers import AutoModelForCausalLM

from prunelab.errors import PrunelabError
from prunelab.models.adapters import UnfusedExperts, find_adapter

EXPECTED = {  # family -> (adapter family, prunable tensors per block)
    "llama": ("llama", 7),
    "mistral": ("llama", 7),
    "qwen2": ("llama", 7),
    "qwen3": ("llama", 7),
    "gemma3": ("llama", 7),
    "olmo2": ("llama", 7),
    "phi3": ("llama", 2 + 2),  # qkv_proj o_proj, gate_up_proj down_proj
    "glm4": ("llama", 4 + 2),
    "starcoder2": ("llama", 4 + 2),
    "gpt_neox": ("llama", 2 + 2),  # query_key_value dense, dense_h_to_4h dense_4h_to_h
    "phi": ("llama", 4 + 2),  # q k v dense, fc1 fc2
    "falcon": ("llama", 2 + 2),  # query_key_value dense, dense_h_to_4h dense_4h_to_h
    "gpt_bigcode": ("llama", 2 + 2),  # c_attn c_proj, c_fc c_proj
    "gpt2": ("llama", 2 + 2),  # c_attn c_proj, c_fc c_proj (Conv1D, held as linears)
    "bloom": ("llama", 2 + 2),  # query_key_value dense, dense_h_to_4h dense_4h_to_h
    "opt": ("opt", 6),
    "biogpt": ("opt", 6),
    "qwen2_moe": ("llama", 4 + 2 + 3),  # q k v o, fused gate_up/down, shared expert gate/up/down
    "mixtral": ("llama", 4 + 2),
    "qwen3_moe": ("llama", 4 + 2),  # q k v o (with q/k norms), fused gate_up/down
    "llama4": ("llama", 4 + (3 + 5) / 2),  # q k v o; gate up down, then fused experts and shared
    "gpt_oss": ("llama", 4 + 2),
    "qwen3_next": ("llama", (3 + 4) / 2 + 2 + 3),  # in_proj_qkvz in_proj_ba out_proj, then q k v o; experts, shared
    "deepseek_v3": ("llama", 5 + (3 + 5) / 2),  # q_a q_b kv_a kv_b o; gate up down, then fused experts and shared
}


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_finds_blocks_and_prunable_weights(family):
    model = tiny_model(family)
    adapter = find_adapter(model)
    name, per_block = EXPECTED[family]
    assert adapter.family == name
    assert len(adapter.blocks) == model.config.num_hidden_layers
    weights = adapter.prunable_weights()
    assert len(weights) == per_block * len(adapter.blocks)
    state = model.state_dict()
    for key, tensor in weights.items():  # names are the saved tensors' names
        assert key in state and state[key].shape == tensor.shape
    assert not any(
        "embed" in k or "lm_head" in k or k.endswith("gate.weight") or "shared_expert_gate" in k for k in weights
    )


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "qwen3_moe", "llama4", "gpt_oss"])
def test_unfused_expert_views_compute_the_same_block_and_write_through(family):
    model = tiny_model(family)
    with torch.no_grad():  # GPT-OSS's expert biases start at zero: make the views' biases count
        for name, p in model.named_parameters():
            if name.endswith("_bias"):
                p.normal_(0, 0.1)
    adapter = find_adapter(model)
    block = adapter.blocks[-1]  # (Llama 4's first block is dense)
    x = torch.randn(2, 8, model.config.hidden_size)
    moe = adapter.halves(block)[1].modules[0]
    prefix = next(name for name, m in block.named_children() if m is moe)
    fused_out = moe(x)
    with adapter.prunable_linears(block) as linears:
        assert isinstance(moe.experts, UnfusedExperts)
        experts = [n for n in linears if ".experts." in n]
        assert len(experts) == 3 * 4  # gate, up, down of each of 4 experts
        torch.testing.assert_close(moe(x), fused_out, rtol=1e-5, atol=1e-6)
        linears[f"{prefix}.experts.down_proj.2"].weight.data.zero_()
    assert not isinstance(moe.experts, UnfusedExperts)
    assert (moe.experts.down_proj[2] == 0).all() and (moe.experts.down_proj[1] != 0).any()


def test_unknown_architecture_names_what_is_missing():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mixer = nn.Linear(8, 8)

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Block() for _ in range(2))

    with pytest.raises(PrunelabError, match=r"unsupported architecture: block Block has children \[mixer\].*q,k,v"):
        find_adapter(Odd())


def test_model_without_block_list_is_rejected():
    with pytest.raises(PrunelabError, match="no list of decoder blocks"):
        find_adapter(nn.Sequential(nn.Linear(4, 4)))


def test_blocks_called_with_positional_arguments_are_recorded_by_name_or_refused_in_one_line():
    from transformers import GPTBigCodeConfig, MvpConfig, MvpForCausalLM

    from prunelab.activations import capture_block_inputs, checked_adapter

    torch.manual_seed(0)  # GPTBigCode passes its (absent) encoder states by position
    model = AutoModelForCausalLM.from_config(GPTBigCodeConfig(vocab_size=256, n_embd=64, n_layer=2, n_head=4)).eval()
    adapter = checked_adapter(model)  # the halves, called with the recorded names, compute block 0
    stream = capture_block_inputs(model, adapter.blocks, torch.randint(0, 256, (2, 8)), None, 2, torch.float32)
    assert "encoder_hidden_states" in stream.block_kwargs[1][0] and "layer_past" in stream.block_kwargs[1][0]
    # MVP's loop also indexes what a block returns, which a stand-in cannot foresee
    config = MvpConfig(vocab_size=256, d_model=64, decoder_layers=12, decoder_attention_heads=4, decoder_ffn_dim=128,
                       encoder_layers=1, encoder_attention_heads=4, encoder_ffn_dim=128, max_position_embeddings=64)
    with pytest.raises(PrunelabError, match=r"failed after decoder block \d+ was recorded \(IndexError") as error:
        checked_adapter(MvpForCausalLM(config).eval())
    assert "\n" not in str(error.value)


def test_block_arguments_that_cannot_be_named_are_refused_in_one_line():
    from prunelab.activations import named_arguments

    class Unnamed(nn.Module):
        def forward(self, hidden_states, *extra, scale=1.0):
            return hidden_states * scale

    h = torch.zeros(1, 2, 4)
    assert named_arguments(Unnamed(), h, (), {"scale": 2.0}) == {"scale": 2.0}
    with pytest.raises(PrunelabError, match=r"positional arguments that have no name \(Unnamed.forward's extra\)"):
        named_arguments(Unnamed(), h, (torch.ones(1),), {})
    with pytest.raises(PrunelabError, match="calls its decoder blocks with arguments their forward does not take"):
        named_arguments(nn.Linear(4, 4), h, (torch.ones(1),), {})


def test_fused_experts_without_an_activation_module_are_refused_in_one_line():
    model = tiny_model("mixtral")
    adapter = find_adapter(model)
    del adapter.blocks[0].mlp.experts.act_fn  # as in an expert layout that computes its activation otherwise
    with pytest.raises(PrunelabError, match="unsupported fused expert layout in MixtralExperts: its gate does not run"):
        with adapter.prunable_linears(adapter.blocks[0]):
            pass


def test_projections_wrapped_around_one_linear_are_pruned_through_it():
    """Moshi wraps each attention projection in a `MoshiLinear` holding one `nn.Linear`: the writer is that
    linear (it used to stop the pass with a bare StopIteration); FLAP, which would replace the wrapper, refuses."""
    import transformers

    import prunelab

    config = transformers.MoshiConfig(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    wrapped = find_adapter(model).blocks[0].self_attn.o_proj
    assert type(wrapped).__name__ == "MoshiLinear"
    ids = torch.randint(3, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    report = prunelab.prune(model, calibration=ids, method="wanda", sparsity=0.5, progress=False,
                            reconstruct={"lr": 1e-3, "epochs": 4, "heldout": 2, "precision": "float32"})
    assert wrapped.linear.weight.eq(0).float().mean() == pytest.approx(0.5)
    assert any(r["layer"].endswith("o_proj.linear") for r in report["layers"])
    losses = {r["submodel"]: (r["loss_train_before"], r["loss_train_after"])
              for r in report["reconstruction"]["submodels"]}
    assert all(after <= before for before, after in losses.values())  # (a worse held-out loss keeps the weights)
    assert losses["block 0 attention"][1] < 0.5 * losses["block 0 attention"][0]  # trained through the wrapper
    with pytest.raises(PrunelabError, match="MoshiAttention.q_proj is a MoshiLinear"):
        prunelab.prune(AutoModelForCausalLM.from_config(config), calibration=ids, method="flap", progress=False)
