import pytest
import torch
from tiny import FAMILIES, random_ids, tiny_model

import prunelab
from prunelab.activations import Arena, capture_block_inputs, checked_adapter, linear_inputs, propagate
from prunelab.errors import PrunelabError
from prunelab.models.adapters import find_adapter


@pytest.mark.parametrize("family", FAMILIES)
def test_block_stream_reproduces_the_models_own_hidden_states(family):
    model = tiny_model(family)
    adapter = find_adapter(model)
    ids = random_ids(6, 16)
    with torch.no_grad():
        reference = model(ids, output_hidden_states=True).hidden_states
    stream = capture_block_inputs(model, adapter.blocks, ids, None, batch_size=4, dtype=torch.float32)
    torch.testing.assert_close(stream.hidden, reference[0])
    for i in range(len(adapter.blocks) - 1):
        attention, mlp = adapter.halves(adapter.blocks[i])
        propagate(attention, stream, i)
        propagate(mlp, stream, i)
        torch.testing.assert_close(stream.hidden, reference[i + 1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family, first_mlp", [("gpt_neox", "dense_h_to_4h"), ("phi", "fc1"),
                                               ("falcon", "dense_h_to_4h")])
def test_a_parallel_blocks_mlp_is_pruned_on_what_it_reads_the_block_input(family, first_mlp):
    """Attention and MLP side by side: the stream between the halves is the block input, not input + attention."""
    model = tiny_model(family)
    adapter = find_adapter(model)
    attention, mlp = adapter.halves(adapter.blocks[0])
    assert attention.deferred and mlp.beside is attention
    reader = getattr(mlp.modules[0], first_mlp)
    seen = []
    handle = reader.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    ids = random_ids(4, 16)
    with torch.no_grad():
        model(ids)
    handle.remove()
    stream = capture_block_inputs(model, adapter.blocks, ids, None, batch_size=4, dtype=torch.float32)
    propagate(attention, stream, 0)
    torch.testing.assert_close(linear_inputs(mlp, reader, stream, 0, keep=Arena()), seen[0])


def test_per_window_arguments_are_told_from_shared_ones_by_how_they_grow_with_the_windows():
    """Bloom's alibi holds a row per head for each window; MPT's position bias a row per head shared by all
    windows. With 4 heads and batches of 4 windows both have 4 rows a batch: only the probe tells them apart."""
    from transformers import AutoModelForCausalLM, MptConfig

    ids, mask = random_ids(8, 16), torch.ones(8, 16, dtype=torch.long)
    mask[6, :5] = 0  # left padding: window 6's alibi differs from the others'
    bloom = tiny_model("bloom")
    stream = capture_block_inputs(bloom, find_adapter(bloom).blocks, ids, mask, batch_size=4, dtype=torch.float32)
    alibi = [batch["alibi"] for batch in stream.block_kwargs[0]]
    assert alibi[0].shape[0] == 16 and not torch.equal(alibi[1][8:12], alibi[1][4:8])
    torch.testing.assert_close(stream.window_kwargs(0, [1, 6])["alibi"], torch.cat([alibi[0][4:8], alibi[1][8:12]]))
    torch.manual_seed(0)
    mpt = AutoModelForCausalLM.from_config(MptConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4,
                                                     max_seq_len=64)).eval()
    stream = capture_block_inputs(mpt, find_adapter(mpt).blocks, ids, None, batch_size=4, dtype=torch.float32)
    bias = stream.block_kwargs[0][0]["position_bias"]
    assert bias.shape[0] == 4 and stream.window_kwargs(0, [1, 6])["position_bias"] is bias


def test_a_block_whose_parts_the_adapter_cannot_call_is_refused_in_one_line(monkeypatch):
    import transformers

    # Bloom's block hands its attention the residual by position; under another name the halves cannot know it
    model = tiny_model("bloom")
    forward = transformers.models.bloom.modeling_bloom.BloomAttention.forward
    monkeypatch.setattr(transformers.models.bloom.modeling_bloom.BloomAttention, "forward",
                        lambda self, hidden_states, skip, **kw: forward(self, hidden_states, skip, **kw))
    with pytest.raises(PrunelabError, match=r"cannot call the parts of BloomBlock .*'skip'") as error:
        checked_adapter(model)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_halves_partition_the_prunable_linears(family):
    model = tiny_model(family)
    adapter = find_adapter(model)
    for block in adapter.blocks:
        with adapter.prunable_linears(block) as linears:
            halves = adapter.halves(block)
            owners = {name: [h.name for h in halves if h.owns(m)] for name, m in linears.items()}
            assert all(len(o) == 1 for o in owners.values()), owners
            assert {o[0] for o in owners.values()} == {"attention", "mlp"}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "ria"])
def test_every_prunable_tensor_gets_the_requested_sparsity(family, method):
    model = tiny_model(family)
    result = prunelab.prune(
        model,
        calibration=random_ids(8, 32),
        method=method,
        sparsity=0.5,
        forward_batch=4,
        reconstruct="none",
        progress=False,
    )
    for name, entry in result["sparsity"]["layers"].items():
        assert entry["sparsity"] == pytest.approx(0.5, abs=1e-9), name
    if method != "magnitude":
        assert all(r["tokens"] > 0 or "fallback" in r for r in result["layers"])
    with torch.no_grad():
        assert torch.isfinite(model(random_ids(2, 16)).logits).all()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "ria"])
def test_two_four_pattern_holds_in_every_row_group(method):
    model = tiny_model("qwen2_moe")
    prunelab.prune(
        model, calibration=random_ids(8, 32), method=method, pattern="2:4", reconstruct="none", progress=False
    )
    for name, w in find_adapter(model).prunable_weights().items():
        groups = (w != 0).reshape(*w.shape[:-1], w.shape[-1] // 4, 4).sum(-1)
        assert (groups <= 2).all(), name
        assert (w == 0).float().mean() == pytest.approx(0.5, abs=0.01), name


def test_wanda_rows_lose_the_same_fraction():
    model = tiny_model("llama")
    prunelab.prune(model, calibration=random_ids(), method="wanda", sparsity=0.25, reconstruct="none", progress=False)
    for name, w in find_adapter(model).prunable_weights().items():
        assert ((w == 0).sum(1) == w.shape[1] // 4).all(), name


def test_statistics_come_from_the_pruned_stream_sequentially():
    ids = random_ids(8, 32)
    model, reference = tiny_model("llama"), tiny_model("llama")
    prunelab.prune(model, calibration=ids, method="wanda", sparsity=0.6, reconstruct="none", progress=False)
    # Expected mask of block 1's q_proj: Wanda scores from inputs that went through the *pruned* block 0.
    reference.model.layers[0].load_state_dict(model.model.layers[0].state_dict())
    with torch.no_grad():
        block1_input = reference(ids, output_hidden_states=True).hidden_states[1]
        x = reference.model.layers[1].input_layernorm(block1_input).reshape(-1, 64)
    w = reference.model.layers[1].self_attn.q_proj.weight
    expected = (w.abs() * x.norm(dim=0)).argsort(dim=1, stable=True)[:, : int(64 * 0.6)]
    pruned = model.model.layers[1].self_attn.q_proj.weight
    assert (pruned.gather(1, expected) == 0).all() and ((pruned == 0).sum(1) == int(64 * 0.6)).all()


@pytest.mark.parametrize("family", ["llama", "opt"])  # OPT's MLP takes its input flattened to [tokens, features]
def test_pad_tokens_are_excluded_from_statistics(family):
    ids = random_ids(4, 16)
    mask = torch.ones_like(ids)
    mask[:, :6] = 0  # left padding
    result = prunelab.prune(
        tiny_model(family), calibration=ids, attention_mask=mask, method="wanda", reconstruct="none", progress=False
    )
    assert {r["tokens"] for r in result["layers"]} == {4 * 10}
    # FLAP's moments too (it indexed OPT's flattened inputs with the [windows, seqlen] mask: IndexError)
    model = tiny_model(family)
    before = sum(p.numel() for p in model.parameters())
    prunelab.prune(model, calibration=ids, attention_mask=mask, method="flap", reconstruct="none", progress=False)
    assert sum(p.numel() for p in model.parameters()) < before


def test_bfloat16_forward_passes_keep_float32_weights_and_exact_sparsity():
    model = tiny_model("llama")
    result = prunelab.prune(
        model, calibration=random_ids(), method="sparsegpt", dtype="bfloat16", reconstruct="none", progress=False
    )
    assert next(model.parameters()).dtype == torch.float32
    assert result["sparsity"]["sparsity"] == pytest.approx(0.5)


def test_nan_activations_raise_a_clear_error():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(PrunelabError, match="non-finite activations"):
        prunelab.prune(model, calibration=random_ids(), method="wanda", reconstruct="none", progress=False)


def test_pattern_that_does_not_divide_a_layer_fails_before_touching_weights():
    model = tiny_model("llama")  # hidden 64, intermediate 128: 7 divides neither
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PrunelabError, match=r"3:7 does not divide layer 0\.self_attn\.q_proj: 64 inputs"):
        prunelab.prune(
            model, calibration=random_ids(), method="wanda", pattern="3:7", reconstruct="none", progress=False
        )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_never_routed_expert_falls_back_to_magnitude():
    model = tiny_model("mixtral")  # 4 experts, 2 per token: one token leaves two experts unused per block
    result = prunelab.prune(model, calibration=random_ids(1, 1), method="sparsegpt", reconstruct="none", progress=False)
    assert any("fallback" in r for r in result["layers"])
    assert result["sparsity"]["sparsity"] == pytest.approx(0.5, abs=1e-6)


def test_block_stream_follows_granites_multipliers_and_stablelms_parallel_branches():
    """Granite scales each branch by residual_multiplier before the residual add (and the embeddings by
    embedding_multiplier); StableLM's use_parallel_residual feeds both branches the same input, a norm each."""
    import transformers

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
    torch.manual_seed(0)
    configs = [(transformers.GraniteConfig(**common, residual_multiplier=0.3, embedding_multiplier=4.0,
                                           attention_multiplier=0.1), False)]
    configs += [(transformers.StableLmConfig(**common, use_parallel_residual=p), p) for p in (True, False)]
    ids = random_ids(4, 16)
    for config, parallel in configs:
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        adapter = find_adapter(model)
        assert adapter.halves(adapter.blocks[0])[0].deferred == parallel
        with torch.no_grad():
            reference = model(ids, output_hidden_states=True).hidden_states
        stream = capture_block_inputs(model, adapter.blocks, ids, None, batch_size=4, dtype=torch.float32)
        for half in adapter.halves(adapter.blocks[0]):
            propagate(half, stream, 0)
        torch.testing.assert_close(stream.hidden, reference[1], rtol=1e-4, atol=1e-5)


def test_a_block_whose_forward_the_halves_do_not_reproduce_is_refused_before_any_work(tiny_dir, texts, tmp_path,
                                                                                         monkeypatch):
    """The adapter is chosen from the module tree; a forward that does more than it shows (here a mixing
    factor on the residual stream, as MiniMax has) is caught on 16 tokens instead of pruned wrongly."""
    import transformers

    from prunelab.activations import checked_adapter

    model = tiny_model("llama")
    assert checked_adapter(model).family == "llama"
    forward = transformers.models.llama.modeling_llama.LlamaDecoderLayer.forward
    monkeypatch.setattr(transformers.models.llama.modeling_llama.LlamaDecoderLayer, "forward",
                        lambda self, hidden_states, **kw: forward(self, hidden_states * 0.8, **kw))
    with pytest.raises(PrunelabError, match="halves do not compute what LlamaDecoderLayer computes"):
        checked_adapter(model)
    calib, evaluation = texts
    for budget in (None, 3e-4):  # loaded whole, and streamed (block 0 read for the check)
        with pytest.raises(PrunelabError, match="halves do not compute"):
            prunelab.run(dict(model=str(tiny_dir), calib=str(calib), eval=str(evaluation), samples=4, seqlen=16,
                              max_memory=budget, out=str(tmp_path / "out")), progress=False)
        assert not (tmp_path / "out").exists()


SKIP = ("*.mlp.down_proj", "model.layers.0.self_attn.*")


def _kept_dense(name: str) -> bool:
    return name.endswith("mlp.down_proj.weight") or name.startswith("model.layers.0.self_attn.")


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_skipped_layers_stay_dense_and_the_rest_is_pruned(method):
    """SparseGPT prunes q, k and v together from one Hessian: the skipped members of a group leave the others'
    masks to the criterion."""
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in find_adapter(model).prunable_weights().items()}
    result = prunelab.prune(model, calibration=random_ids(), method=method, pattern="2:4", skip=list(SKIP),
                            reconstruct="none", progress=False)
    after = find_adapter(model).prunable_weights()
    assert sum(map(_kept_dense, after)) == 6
    for name, weight in after.items():
        if _kept_dense(name):
            assert torch.equal(weight, before[name]), name
        else:
            assert (weight.reshape(-1, 4) == 0).sum(1).eq(2).all(), name
    skipped = {(r["block"], r["layer"]) for r in result["layers"] if r.get("skipped")}
    assert skipped == {(0, "self_attn.q_proj"), (0, "self_attn.k_proj"), (0, "self_attn.v_proj"),
                       (0, "self_attn.o_proj"), (0, "mlp.down_proj"), (1, "mlp.down_proj")}
    dense_share = sum(w.numel() for n, w in after.items() if _kept_dense(n)) / sum(w.numel() for w in after.values())
    assert result["sparsity"]["sparsity"] == pytest.approx(0.5 * (1 - dense_share))


def test_skipped_layers_are_reconstructed_without_a_mask():
    model = tiny_model("llama")
    result = prunelab.prune(model, calibration=random_ids(8, 16), method="wanda", skip=list(SKIP),
                            reconstruct={"lr": 1e-3, "heldout": 2}, progress=False)
    for name, weight in find_adapter(model).prunable_weights().items():
        assert int((weight == 0).sum()) == (0 if _kept_dense(name) else weight.numel() // 2), name
    mlp = next(r for r in result["reconstruction"]["submodels"] if r["submodel"] == "block 1 mlp")
    # half of gate and of up (128 × 64 each), all of the skipped down_proj (64 × 128), the norm (64)
    assert mlp["trainable"] == 4096 + 4096 + 8192 + 64


def test_skip_patterns_are_checked_before_any_work():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for skip, message in [(["*.down"], r"skip pattern '\*\.down' matches no prunable layer \(module names such as "
                                       r"'model\.layers\.0\.self_attn\.q_proj'\)"),
                          (["*proj"], "keeps every prunable layer dense: nothing is left to prune"),
                          ("*.down_proj", r"skip must be a list of strings, got '\*\.down_proj'")]:
        with pytest.raises(PrunelabError, match=message):
            prunelab.prune(model, calibration=random_ids(), skip=skip, reconstruct="none", progress=False)
    with pytest.raises(PrunelabError, match="skip keeps layers dense while weights are zeroed; method flap"):
        prunelab.prune(model, calibration=random_ids(), method="flap", skip=["*.q_proj"], progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
