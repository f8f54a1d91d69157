"""Width pruning (FLAP): scores, structure, bias compensation, physically smaller layers that prunelab
reloads exactly, and a same-shape export that plain transformers loads."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny import random_ids, tiny_model
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import prunelab
from prunelab.cli import app
from prunelab.config import RunConfig
from prunelab.errors import PrunelabError
from prunelab.models.adapters import MLP_LAYOUTS, find_adapter, layout
from prunelab.models.conv1d import released
from prunelab.models.loading import load_model
from prunelab.models.narrow import export_masked, write_structure
from prunelab.structured import check_structured
from prunelab.structured.width import collect, flap_layers, prune_width, score

runner = CliRunner()


def flap(model, ids, **width):
    return prune_width(model, find_adapter(model), ids, RunConfig.from_dict({"method": "flap", "width": width}),
                       progress=False)


def block_params(model):
    return sum(p.numel() for b in find_adapter(model).blocks for n, p in b.named_parameters() if "norm" not in n)


def test_score_is_fluctuation_times_squared_column_norm_standardised():
    model = tiny_model("llama", layers=2)
    ids = random_ids(4, 16)
    adapter = find_adapter(model)
    layers = flap_layers(adapter)
    collect(model, adapter, layers, ids, None, 3, progress=False)
    score(layers)
    mlp = layers[1]
    seen = []
    handle = mlp.writer.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(ids)
    handle.remove()
    x = torch.cat(seen).double()
    raw = x.var(0) * mlp.writer.weight.detach().double().pow(2).sum(0)
    expected = (raw - raw.mean()) / raw.std()
    torch.testing.assert_close(mlp.scores, expected, rtol=1e-6, atol=1e-9)


def test_moments_leave_pad_tokens_out():
    model = tiny_model("llama", layers=2)
    ids = random_ids(4, 16)
    mask = torch.ones_like(ids)
    mask[0, 11:] = 0  # right padding: the real tokens' activations do not depend on it
    mask[2, 5:] = 0
    adapter = find_adapter(model)
    layers = flap_layers(adapter)
    collect(model, adapter, layers, ids, mask, 3, progress=False)
    seen = []
    handle = layers[3].writer.register_forward_pre_hook(lambda m, a: seen.append(a[0][mask.bool()]))
    with torch.no_grad():
        model(ids, attention_mask=mask)
    handle.remove()
    x = torch.cat(seen).double()
    assert layers[3].moments.count == int(mask.sum()) == x.shape[0]
    torch.testing.assert_close(layers[3].moments.mean, x.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layers[3].moments.variance, x.var(0), rtol=1e-4, atol=1e-6)


def mlp_widths(mlp) -> list[int]:
    """The MLP's inner width as each of its linears sees it (a fused gate_up_proj holds it twice)."""
    *readers, writer = layout(mlp, MLP_LAYOUTS)
    return [getattr(mlp, n).out_features // (2 if n == "gate_up_proj" else 1) for n in readers] + [
        getattr(mlp, writer).in_features]


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3", "glm4", "starcoder2"])
def test_adaptive_removes_the_ratio_of_parameters_and_layers_shrink(family):
    model = tiny_model(family, layers=3)
    before = block_params(model)
    report = flap(model, random_ids(4, 16), ratio=0.3)
    after = block_params(model)
    one_channel = 3 * model.config.hidden_size
    assert 0.3 * before - 2 * one_channel <= before - after <= 0.3 * before + 4 * model.config.hidden_size * 32
    for b in find_adapter(model).blocks:
        assert len(set(mlp_widths(b.mlp))) == 1
        assert b.self_attn.q_proj.out_features == b.self_attn.o_proj.in_features
    assert sum(r["removed"] for r in report["layers"]) > 0
    with torch.no_grad():
        assert torch.isfinite(model(random_ids(2, 8)).logits).all()


def test_uniform_removes_the_same_fraction_of_every_layer_and_whole_kv_groups():
    model = tiny_model("llama", layers=2)  # 4 query heads, 2 KV heads: KV groups of 2 heads
    report = flap(model, random_ids(4, 16), ratio=0.5, structure="uniform")
    assert [r["removed"] for r in report["layers"]] == [1, 64, 1, 64]
    for b in find_adapter(model).blocks:
        attn = b.self_attn
        assert attn.k_proj.out_features == attn.v_proj.out_features == attn.head_dim
        assert attn.q_proj.out_features == 2 * attn.head_dim  # query heads per KV head unchanged


def test_bias_compensation_keeps_the_mean_output_of_the_writer():
    ids = random_ids(6, 16)
    outputs = {}

    def mean_output(model, key):
        seen = []
        writer = find_adapter(model).blocks[0].self_attn.o_proj
        handle = writer.register_forward_hook(lambda m, a, out: seen.append(out.reshape(-1, out.shape[-1])))
        with torch.no_grad():
            model(ids)
        handle.remove()
        outputs[key] = torch.cat(seen).mean(0)

    model = tiny_model("llama", layers=2)
    mean_output(model, "dense")
    flap(model, ids, ratio=0.5, structure="uniform")
    mean_output(model, "compensated")
    plain = tiny_model("llama", layers=2)
    flap(plain, ids, ratio=0.5, structure="uniform", bias_compensation=False)
    mean_output(plain, "plain")
    torch.testing.assert_close(outputs["compensated"], outputs["dense"], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(outputs["plain"], outputs["dense"], atol=1e-4)
    assert find_adapter(plain).blocks[0].self_attn.o_proj.bias is None


@pytest.mark.parametrize("family", ["llama", "glm4", "phi"])  # glm4: the kept gate and up rows of one fused linear;
# phi: attention and MLP side by side, the attention writer called `dense`
def test_prunelab_reloads_the_narrow_model_exactly_and_export_loads_in_plain_transformers(family, tmp_path, tokenizer):
    model = tiny_model(family, layers=2)
    dense = tiny_model(family, layers=2)
    # GLM-4's config has no switch for an MLP output bias, so its stock-shape export needs it left out
    report = flap(model, random_ids(4, 16), ratio=0.3, bias_compensation=family == "llama")
    assert any(len(set(mlp_widths(b.mlp))) == 1 and mlp_widths(b.mlp)[0] < mlp_widths(d.mlp)[0]
               for b, d in zip(find_adapter(model).blocks, find_adapter(dense).blocks))
    plain = reloads_exactly_and_exports(model, report, tmp_path, tokenizer)
    assert plain.config.num_attention_heads == model.config.num_attention_heads


def reloads_exactly_and_exports(model, report, folder, tokenizer):
    """Saved narrow, prunelab reloads `model` exactly; exported at the dense shapes, plain transformers loads
    the same model (returned)."""
    with released(model):  # as a run saves it: GPT-2's Conv1D layers as its checkpoints store them
        model.save_pretrained(folder / "narrow")
    tokenizer.save_pretrained(folder / "narrow")
    write_structure(folder / "narrow", report["linears"])
    reloaded, _, _ = load_model(str(folder / "narrow"), device="cpu")
    ids = random_ids(2, 8)
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(reloaded(ids).logits, expected)
    result = runner.invoke(app, ["export", str(folder / "narrow"), "--out", str(folder / "masked")])
    assert result.exit_code == 0, result.output
    plain = AutoModelForCausalLM.from_pretrained(folder / "masked").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, expected, rtol=1e-5, atol=1e-5)
    return plain


@pytest.mark.parametrize("family", ["opt", "biogpt"])  # OPT splits its heads by a head count, BioGPT by their size
def test_opt_family_loses_whole_heads_and_channels_reloads_exactly_and_exports(family, tmp_path, tokenizer):
    model = tiny_model(family, layers=2)  # 4 heads, MLP 128
    report = flap(model, random_ids(4, 16), ratio=0.5, structure="uniform")
    assert [r["removed"] for r in report["layers"]] == [2, 64, 2, 64]
    for b in find_adapter(model).blocks:
        attn = b.self_attn
        assert attn.q_proj.out_features == attn.k_proj.out_features == attn.v_proj.out_features \
            == attn.out_proj.in_features == 2 * attn.head_dim
        assert getattr(attn, "num_heads", 2) == 2 and b.fc1.out_features == b.fc2.in_features == 64
    reloads_exactly_and_exports(model, report, tmp_path, tokenizer)  # OPT's linears have biases for the shift



def computes_as_zeroed(model, dense, report, ids):
    """The narrowed `model` computes what `dense` does with the removed heads' and channels' rows (q, k and v
    wherever a fused order puts them) and the writers' columns zeroed."""
    modules = dict(dense.named_modules())
    with torch.no_grad():
        for name, entry in report["linears"].items():
            linear = modules[name]
            for dim, kept in ((0, entry["rows"]), (1, entry["cols"])):
                if kept is not None:
                    gone = torch.ones(linear.weight.shape[dim], dtype=torch.bool)
                    gone[kept] = False
                    linear.weight[(gone,) if dim == 0 else (slice(None), gone)] = 0
                    if dim == 0 and linear.bias is not None:
                        linear.bias[gone] = 0
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)


def from_config(name: str, **kwargs):
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, name)(vocab_size=256, num_hidden_layers=2, pad_token_id=0, **kwargs)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("name, kwargs", [
    ("StableLmConfig", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)),
    ("XGLMConfig", dict(d_model=64, ffn_dim=128, attention_heads=4, max_position_embeddings=64))])
def test_separate_projections_split_by_a_head_count_are_recounted(name, kwargs, tmp_path, tokenizer):
    """StableLM splits its heads by `num_heads`, XGLM merges them back into `embed_dim`: both set from the
    narrowed shapes (they crashed once FLAP removed a head)."""
    model, dense, ids = from_config(name, **kwargs), from_config(name, **kwargs), random_ids(4, 16)
    check_structured(find_adapter(model), RunConfig.from_dict({"method": "flap"}))
    report = flap(model, ids, ratio=0.5, structure="uniform", bias_compensation=False)
    assert [r["removed"] for r in report["layers"]] == [2, 64, 2, 64]
    computes_as_zeroed(model, dense, report, ids)
    reloads_exactly_and_exports(model, report, tmp_path, tokenizer)


@pytest.mark.parametrize("name, kwargs, message", [
    # its differential attention pairs the heads up: one removed, the pairs no longer split
    ("DiffLlamaConfig", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2),
     "DiffLlamaDecoderLayer: with a kv group removed its attention .* zeroed \\(ValueError"),
    # attention sinks, one per query head, that the narrowing does not slice
    ("GraniteSWAConfig", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2),
     "GraniteSWADecoderLayer: with a kv group removed its attention .* zeroed \\(RuntimeError")])
def test_a_block_whose_forward_breaks_without_a_unit_is_refused(name, kwargs, message):
    """The adaptive choice may spare these attentions on one model and not on the next: refused up front, in one
    line, whatever the narrowed forward raises, and the weights and counts left as they were."""
    model = from_config(name, **kwargs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PrunelabError, match=message):
        prunelab.prune(model, None, {"method": "flap"}, calibration=random_ids(2, 8), reconstruct="none",
                       progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.isfinite(model(random_ids(1, 8)).logits).all()


def test_counts_the_rules_would_misread_on_the_dense_block_are_refused_and_restored(monkeypatch):
    from prunelab.models import adapters

    monkeypatch.setattr(adapters.LlamaAdapter, "recount",
                        lambda self, block: setattr(block.self_attn, "num_key_value_groups", 7))
    model = tiny_model("llama", layers=2)
    with pytest.raises(PrunelabError, match="head counts it would set from the shapes differ from the model's own "
                                            "\\(self_attn.num_key_value_groups\\)"):
        check_structured(find_adapter(model), RunConfig.from_dict({"method": "flap"}))
    assert find_adapter(model).blocks[0].self_attn.num_key_value_groups == 2


MULTI_QUERY = dict(new_decoder_architecture=False, multi_query=True, parallel_attn=True)  # Falcon-7B's attention


@pytest.mark.parametrize("family, overrides, heads", [
    # q, k and v fused in parts (GPT-2's Conv1D, split at `split_size`; Phi-3's grouped heads, split at its config's
    # counts) or group by group (GPT-NeoX's heads, split by their size; Falcon-40B's KV groups, at num_kv_heads)
    ("gpt2", {}, 4), ("gpt_neox", {}, 4), ("phi3", {}, 2), ("falcon", {}, 2),
    # multi-query: the query heads are the units, the one key and value head stays (Gemma 3 270M and 1B; Falcon-7B
    # and StarCoder 1 with q, k and v fused)
    ("gemma3", {"num_key_value_heads": 1}, 4), ("falcon", MULTI_QUERY, 4), ("gpt_bigcode", {}, 4)])
def test_fused_and_multi_query_attention_lose_whole_heads_reload_exactly_and_export(family, overrides, heads,
                                                                                    tmp_path, tokenizer):
    model, dense = tiny_model(family, layers=2, **overrides), tiny_model(family, layers=2, **overrides)
    ids = random_ids(4, 16)
    check_structured(find_adapter(model), RunConfig.from_dict({"method": "flap"}))  # the probe passes and leaves the
    assert all(torch.equal(v, w) for v, w in zip(model.state_dict().values(), dense.state_dict().values()))  # weights
    report = flap(model, ids, ratio=0.5, structure="uniform", bias_compensation=False)
    inner = mlp_widths(find_adapter(dense).blocks[0].mlp)[0]
    assert [(r["units"], r["removed"]) for r in report["layers"]] == [(heads, heads // 2), (inner, inner // 2)] * 2
    computes_as_zeroed(model, dense, report, ids)
    if family == "phi3":  # each narrowed layer splits at the head counts of a config of its own
        attn = find_adapter(model).blocks[0].self_attn
        assert (attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.num_key_value_heads) == (2, 1, 1)
        assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)  # saved as it was
    reloads_exactly_and_exports(model, report, tmp_path, tokenizer)



@pytest.mark.parametrize("fault", ["order", "recount"])
def test_a_fused_order_misread_or_a_count_left_stale_is_refused_before_any_work(fault, monkeypatch):
    """The fused orders and the counts to reset are read from the module tree by rules; the probe is their proof:
    had the rules misread GPT-2's order (one head's rows taken for another's) or left its `split_size` as it was,
    the narrowed block would compute something else (or crash); the API refuses in one line, weights untouched."""
    from prunelab import api
    from prunelab.models import adapters

    if fault == "order":  # each head's q, k and v rows taken for another head's: the shapes still fit
        real = adapters._attention_width

        def misread(block, attn):
            width = real(block, attn)
            width.readers = {name: rows[::-1] for name, rows in width.readers.items()}
            return width
        monkeypatch.setattr(adapters, "_attention_width", misread)
    else:
        monkeypatch.setattr(adapters.LlamaAdapter, "recount", lambda self, block: None)
    model = tiny_model("gpt2", layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    detail = "relative difference" if fault == "order" else "shapes cannot be multiplied"
    with pytest.raises(PrunelabError, match=f"width pruning is not supported for GPT2Block: with a head removed its "
                                            f"attention does not compute what it computes with the head zeroed "
                                            f".*{detail}"):
        api.prune(model, None, {"method": "flap"}, calibration=random_ids(2, 8), reconstruct="none", progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert find_adapter(model).blocks[0].attn.split_size == model.config.hidden_size  # counts restored


def test_export_without_room_for_biases_is_refused_with_the_way_out(tmp_path):
    model = tiny_model("mistral", layers=2)
    report = flap(model, random_ids(4, 16), ratio=0.3)
    with pytest.raises(PrunelabError, match="--no-bias-compensation"):
        export_masked(model, report["linears"], tmp_path / "m")
    model = tiny_model("gemma3", layers=2)
    report = flap(model, random_ids(4, 16), ratio=0.3, bias_compensation=False)
    export_masked(model, report["linears"], tmp_path / "g")
    with torch.no_grad():
        ids = random_ids(2, 8)
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "g").eval()(ids).logits,
                                   model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model, message", [
    ("/no/such/run", "model folder not found: /no/such/run"),
    (__file__, "model must be a model folder or a .gguf file, got the file"),
    (None, "has no prunelab_structure.json: it was not narrowed by prunelab (nothing to expand)"),
])
def test_export_of_what_is_not_a_narrowed_model_is_one_line(model, message, tiny_dir, tmp_path):
    result = runner.invoke(app, ["export", model or str(tiny_dir), "--out", str(tmp_path / "wide")])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "wide").exists()


def test_flap_job_saves_a_smaller_model_with_its_structure(tiny_dir, texts, tmp_path):
    calib, evaluation = texts
    out = tmp_path / "flap"
    result = runner.invoke(app, ["run", "--model", str(tiny_dir), "--calib", str(calib), "--eval", str(evaluation),
                                 "--samples", "4", "--seqlen", "16", "--eval-seqlen", "16", "--eval-windows", "2",
                                 "--method", "flap", "--ratio", "0.25", "--structure", "uniform", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "prunelab.json").read_text())
    structure = report["structure"]
    assert structure["parameters_saved"] == structure["parameters_after"] < structure["parameters_before"]
    assert "linears" not in structure and (out / "prunelab_structure.json").is_file()
    assert report["config"]["width"] == {"ratio": 0.25, "structure": "uniform", "bias_compensation": True}
    evaluated = runner.invoke(app, ["eval", "--model", str(out), "--eval", str(evaluation), "--eval-seqlen", "16",
                                    "--eval-windows", "2", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert "## Width removal (FLAP)" in (out / "REPORT.md").read_text()


def test_a_bfloat16_model_narrowed_and_exported_stays_bfloat16(tokenizer, texts, tmp_path):
    folder, narrow, masked = tmp_path / "bf16", tmp_path / "narrow", tmp_path / "masked"
    tiny_model("llama", layers=2).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    prunelab.run(dict(model=str(folder), calib=str(texts[0]), eval="none", samples=4, seqlen=16, method="flap",
                      width={"ratio": 0.25}, speed=False, out=str(narrow)), progress=False)
    result = runner.invoke(app, ["export", str(narrow), "--out", str(masked)])
    assert result.exit_code == 0, result.output
    for saved in (narrow, masked):
        assert {t.dtype for t in load_file(saved / "model.safetensors").values()} == {torch.bfloat16}
    reloaded, _, _ = load_model(str(narrow), device="cpu")
    plain = AutoModelForCausalLM.from_pretrained(masked, dtype=torch.float32).eval()
    ids = random_ids(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, reloaded(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ratio", "0"], "width.ratio must be in (0, 1)"),
        (["--ratio", "1"], "width.ratio must be in (0, 1)"),
        (["--ratio", "0.2", "--structure", "random"], "width.structure must be one of adaptive, uniform"),
        (
            ["--ratio", "0.2", "--reconstruct", "blocks:2"],
            "reconstruction trains halves or blocks (attn-mlp | block), not blocks:2",
        ),
    ],
)
def test_bad_width_input_is_refused_and_nothing_is_written(args, message, tiny_dir, texts, tmp_path):
    calib, evaluation = texts
    result = runner.invoke(
        app,
        [
            "run", "--model", str(tiny_dir), "--calib", str(calib), "--eval", str(evaluation), "--samples", "4",
            "--seqlen", "16", "--method", "flap", "--out", str(tmp_path / "o"),
        ]
        + args,
    )
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "family, message", [("mixtral", "Mixture-of-Experts"),
                        # ALiBi slopes counting the model's heads, not the narrowed layer's: the probe refuses it
                        ("bloom", "BloomBlock: with a head removed its attention does not compute what it computes"),
                        ("olmo2", "Olmo2Attention.q_norm normalises across all heads"),
                        ("deepseek_v3", "DeepseekV3Attention computes keys and values from a shared latent"),
                        ("qwen3_next", "routes tokens to experts")]
)
def test_flap_refuses_layouts_it_does_not_know(family, message):
    model = tiny_model(family, layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PrunelabError, match=message):
        prunelab.prune(model, None, {"method": "flap"}, calibration=random_ids(2, 8), reconstruct="none",
                       progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_flap_refuses_a_norm_across_the_units_it_would_remove():
    """BitNet normalises the attention's and the MLP's inner width (`attn_sub_norm`, `ffn_sub_norm`): narrowing
    the projections alone crashed in its forward; it is refused before any work, the weights untouched."""
    import transformers

    config = transformers.BitNetConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PrunelabError, match="BitNetAttention.attn_sub_norm holds a weight for every one of them"):
        flap(model, random_ids(2, 8), ratio=0.2)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
