"""Quantized checkpoints: dequantized on load where transformers can (MXFP4, block FP8), refused in one line where
it cannot, and saved as plain float checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_inputs import base_args, cli
from tiny import mxfp4_checkpoint, quantized_checkpoint, random_ids, tiny_model
from transformers import AutoModelForCausalLM
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

import prunelab
from prunelab.errors import PrunelabError
from prunelab.models.loading import float_weights, load_model


@pytest.fixture()
def mxfp4_dir(tmp_path, tokenizer):
    return mxfp4_checkpoint(tmp_path / "gpt-oss-mxfp4", tokenizer)


def test_mxfp4_experts_load_as_transformers_dequantizes_them_and_save_as_plain_floats(mxfp4_dir, texts, tmp_path):
    stored = load_file(mxfp4_dir / "model.safetensors")
    name = "model.layers.0.mlp.experts.gate_up_proj"
    expected = convert_moe_packed_tensors(stored[f"{name}_blocks"], stored[f"{name}_scales"], dtype=torch.float32)
    model = load_model(str(mxfp4_dir))[0]
    assert torch.equal(model.get_parameter(name), expected)
    # asked for even where transformers would keep the codes (a GPU with its MXFP4 kernels)
    assert float_weights("m", {"quant_method": "mxfp4"})["quantization_config"].dequantize is True

    code, output = cli(*base_args(mxfp4_dir, texts, tmp_path / "out"), "--reconstruct", "none")
    assert code == 0, output
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert json.loads((tmp_path / "out" / "prunelab.json").read_text())["model"]["dequantized_from"] == "mxfp4"
    assert f"{mxfp4_dir} (dequantized from mxfp4)" in (tmp_path / "out" / "REPORT.md").read_text()
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert saved[name].dtype == torch.float32 and f"{name}_blocks" not in saved
    assert float((saved[name] == 0).float().mean()) == 0.5
    kept = saved[name] != 0
    assert torch.equal(saved[name][kept], expected[kept])  # pruning only zeroed dequantized weights
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(reloaded.get_parameter(name), saved[name])


def test_block_fp8_linears_load_as_their_codes_times_their_scales(tiny_dir, texts, tmp_path):
    state = load_file(tiny_dir / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    for key in [k for k in state if ".layers." in k and k.endswith("proj.weight")]:
        rows, cols = state[key].shape
        state[key] = (state[key] / 0.01).to(torch.float8_e4m3fn)
        state[key.removesuffix("weight") + "weight_scale_inv"] = torch.full((rows // 32, cols // 32), 0.01)
    quantized_checkpoint(tiny_dir, state, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                           "weight_block_size": [32, 32]})
    model = load_model(str(tiny_dir))[0]
    assert type(model.get_submodule(name.removesuffix(".weight"))) is torch.nn.Linear
    assert torch.allclose(model.get_parameter(name), state[name].float() * 0.01, rtol=1e-6, atol=0)
    code, output = cli(*base_args(tiny_dir, texts, tmp_path / "out"), "--reconstruct", "none")
    assert code == 0, output
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert float((saved[name] == 0).float().mean()) == 0.5 and not [k for k in saved if k.endswith("scale_inv")]


@pytest.mark.parametrize("method", ["gptq", "bitsandbytes"])
def test_a_quantization_transformers_cannot_undo_is_refused_before_any_work(method, tiny_dir, texts, tmp_path):
    quantized_checkpoint(tiny_dir, load_file(tiny_dir / "model.safetensors"), {"quant_method": method, "bits": 4})
    code, output = cli(*base_args(tiny_dir, texts, tmp_path / "out"))
    assert code == 2 and f"holds {method}-quantized weights" in output and "start from the unquantized model" in output
    assert not (tmp_path / "out").exists()


def test_a_quantized_checkpoint_larger_than_the_budget_is_refused_not_streamed(mxfp4_dir, texts, tmp_path):
    code, output = cli(*base_args(mxfp4_dir, texts, tmp_path / "out"), "--max-memory", "0.0001")
    assert code == 2 and "mxfp4-quantized weights that take" in output and "streams only float checkpoints" in output
    assert not (tmp_path / "out").exists()


def test_a_model_quantized_in_memory_is_refused_by_the_api_before_any_work():
    model = tiny_model("llama")
    linear = model.model.layers[1].self_attn.v_proj
    linear.weight.data = linear.weight.data.to(torch.float8_e4m3fn)  # as FP8Linear holds them on a GPU
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PrunelabError, match=r"model.layers.1.self_attn.v_proj.weight holds float8_e4m3fn weights "
                                            r"\(Linear\): prunelab prunes float weights"):
        prunelab.prune(model, calibration=random_ids(), method="wanda", sparsity=0.5, progress=False)
    assert all(torch.equal(v.float(), before[k].float()) for k, v in model.state_dict().items())
