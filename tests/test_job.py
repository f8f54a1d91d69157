"""The whole job on a tiny saved model: save, reload with plain transformers, report, bad input."""

import json
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny import tiny_model
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import prunelab
from prunelab import cli
from prunelab.cli import app
from prunelab.errors import PrunelabError
from prunelab.models.adapters import find_adapter

runner = CliRunner()


def job(tiny_dir, texts, out, **overrides):
    calib, evaluation = texts
    values = dict(model=str(tiny_dir), calib=str(calib), eval=str(evaluation), samples=8, seqlen=32,
                  eval_seqlen=32, eval_windows=4, forward_batch=4, out=str(out))
    values.update(overrides)
    return prunelab.run(values, progress=False)


def test_saved_model_reloads_with_same_logits_and_mask(tiny_dir, texts, tmp_path):
    out = tmp_path / "pruned"
    report = job(tiny_dir, texts, out, method="sparsegpt")
    assert {"REPORT.md", "config.json", "model.safetensors", "prunelab.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 200, (2, 24))
    saved = json.loads((out / "prunelab.json").read_text())
    weights = find_adapter(reloaded).prunable_weights()
    assert set(weights) == set(saved["sparsity"]["layers"])
    for name, w in weights.items():
        assert int((w == 0).sum()) == saved["sparsity"]["layers"][name]["zeros"]
        assert (w == 0).float().mean() == pytest.approx(0.5)
    assert saved["sparsity"]["measured_on"] == "saved safetensors"
    assert saved["metrics"]["pruned"]["perplexity"] > 1
    assert len(saved["data"]["calibration"]["starts"]) == 8 and saved["config"]["seed"] == 0
    assert report["metrics"] == saved["metrics"]
    with torch.no_grad():
        assert torch.isfinite(reloaded(ids).logits).all()


@pytest.mark.parametrize("family, retrain", [("mixtral", "none"), ("qwen2_moe", "masklora"), ("qwen3_moe", "full")])
def test_routed_experts_saved_per_expert_keep_their_mask(family, retrain, tokenizer, texts, tmp_path):
    """transformers saves fused expert tensors in the checkpoint's own layout (one matrix per expert and
    projection): the sparsity read back from the files sums those, and a reload fuses them to the same mask."""
    from tiny import tiny_model

    folder = tmp_path / family
    tiny_model(family).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "pruned"
    retraining = {"method": retrain, "tokens": 8 * 32, "heldout": 2, "batch_size": 2, "lr": 1e-3}
    report = job(folder, texts, out, reconstruct="none", retrain=retraining, eval_windows=2)
    layers = report["sparsity"]["layers"]
    fused = [name for name in layers if name.endswith("experts.gate_up_proj")]
    assert fused and len(layers[fused[0]]["stored_as"]) == 2 * 4  # gate and up of each of the 4 experts
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    weights = find_adapter(reloaded).prunable_weights()
    assert set(weights) == set(layers)
    for name, w in weights.items():
        assert int((w == 0).sum()) == layers[name]["zeros"] and w.numel() == layers[name]["numel"], name
    assert report["sparsity"]["sparsity"] == pytest.approx(0.5, abs=1e-9)


def test_reload_gives_identical_logits(tiny_dir, texts, tmp_path, monkeypatch):
    import prunelab.job

    kept = {}
    real_save = prunelab.job.save

    def save_and_keep(model, *args, **kwargs):
        kept["model"] = model
        return real_save(model, *args, **kwargs)

    monkeypatch.setattr(prunelab.job, "save", save_and_keep)
    out = tmp_path / "saved"
    job(tiny_dir, texts, out, method="wanda", pattern="2:4", eval="none")
    model, reloaded = kept["model"], AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 200, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    for (name, a), b in zip(
        find_adapter(model).prunable_weights().items(), find_adapter(reloaded).prunable_weights().values()
    ):
        assert torch.equal(a == 0, b == 0), name


def test_existing_output_folder_is_refused_and_untouched(tiny_dir, texts, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(PrunelabError, match="output folder already exists"):
        job(tiny_dir, texts, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(PrunelabError, match="not a prunelab output folder"):  # --overwrite replaces only our runs
        job(tiny_dir, texts, out, overwrite=True, eval="none")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    run = tmp_path / "run"
    job(tiny_dir, texts, run, eval="none")
    (run / "extra.txt").write_text("old")
    job(tiny_dir, texts, run, overwrite=True, eval="none")
    assert (run / "prunelab.json").exists() and not (run / "extra.txt").exists()


def test_pattern_that_does_not_divide_a_layer_is_refused_before_the_dense_evaluation(tiny_dir, texts, tmp_path,
                                                                                     monkeypatch):
    import prunelab.job

    def evaluated(*args, **kwargs):
        raise AssertionError("the dense model was evaluated before the pattern was checked")

    monkeypatch.setattr(prunelab.job, "perplexity", evaluated)
    with pytest.raises(PrunelabError, match=r"3:7 does not divide layer 0\.self_attn\.q_proj: 64 inputs"):
        job(tiny_dir, texts, tmp_path / "out", pattern="3:7")
    assert not (tmp_path / "out").exists()


def test_skip_from_the_command_line_is_reported_and_saved(tiny_dir, texts, tmp_path):
    calib, evaluation = texts
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", "--model", str(tiny_dir), "--calib", str(calib), "--eval", "none",
                                 "--samples", "4", "--seqlen", "16", "--reconstruct", "none",
                                 "--skip", "*.mlp.down_proj, *.o_proj", "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "prunelab.json").read_text())
    assert saved["config"]["skip"] == ["*.mlp.down_proj", "*.o_proj"]
    layers = saved["sparsity"]["layers"]
    assert {n for n, e in layers.items() if e["sparsity"] == 0} == {
        f"model.layers.{i}.{n}.weight" for i in (0, 1) for n in ("mlp.down_proj", "self_attn.o_proj")}
    assert "| kept dense (skip) | 4 layers matching *.mlp.down_proj, *.o_proj; counted above |" in (
        out / "REPORT.md").read_text()


def test_failure_while_saving_leaves_nothing_behind(tiny_dir, texts, tmp_path, monkeypatch):
    import prunelab.report

    def broken(report, folder):
        raise OSError("disk full")

    monkeypatch.setattr(prunelab.report, "write", broken)
    with pytest.raises(OSError):
        job(tiny_dir, texts, tmp_path / "out", eval="none")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))] == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sparsity", "1.0"], "sparsity must be in [0, 1), got 1.0"),
        (["--sparsity", "-0.1"], "sparsity must be in [0, 1)"),
        (["--pattern", "4:2"], "pattern N:M needs 0 < N < M"),
        (["--pattern", "2-4"], "pattern must look like N:M"),
        (["--method", "flap", "--pattern", "2:4"], "pattern 2:4 zeroes weights in N:M groups; method flap removes"),
        (["--method", "random"], "method must be one of magnitude, wanda, sparsegpt, ria, layers, flap, got 'random'"),
        (["--model", "/no/such/model"], "model folder not found: /no/such/model"),
        (["--model", "/no/such/model.gguf"], "model file not found"),
        (["--model", "/"], "not a model folder (no config.json): /"),
        (["--model", __file__], f"model must be a model folder or a .gguf file, got the file {__file__}"),
        (["--calib", "missing.txt"], "unknown text source"),
        (["--samples", "0"], "samples must be a positive integer"),
    ],
)
def test_cli_bad_input_gives_one_line_error(args, message, tiny_dir, texts, tmp_path):
    calib, evaluation = texts
    base = [
        "run", "--model", str(tiny_dir), "--calib", str(calib), "--eval", str(evaluation), "--samples", "4",
        "--seqlen", "16", "--out", str(tmp_path / "o"),
    ]
    result = runner.invoke(app, base + args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--samples", "abc"], "error: prunelab run: Invalid value for '--samples'"),
        (["run", "--sparsity", "0.5.1"], "error: prunelab run: Invalid value for '--sparsity'"),
        (["run", "--no-such-flag"], "error: prunelab run: No such option: --no-such-flag"),
        (["run", "--lr"], "error: Option '--lr' requires an argument"),
        (["prnue"], "error: prunelab: No such command 'prnue'"),
        (["run", "--sparsity", "1.5"], "error: sparsity must be in [0, 1), got 1.5"),  # prunelab's own, alike
    ],
)
def test_the_command_gives_usage_errors_in_one_line(args, message, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["prunelab", *args])
    with pytest.raises(SystemExit) as done:
        cli.main()
    err = capsys.readouterr().err
    assert done.value.code == 2
    assert err.startswith(message) and err.count("\n") == 1, err  # typer drew a box of 4 lines and more
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, code", [(["--version"], 0), (["run", "--help"], 0), ([], 2)])
def test_the_command_shows_help_and_version_with_their_exit_codes(args, code, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["prunelab", *args])
    with pytest.raises(SystemExit) as done:
        cli.main()
    out = capsys.readouterr()
    assert done.value.code == code
    assert "error" not in out.err
    assert ("prunelab 0." if args == ["--version"] else "Usage: prunelab") in out.out + out.err


@pytest.mark.parametrize("max_memory", [None, 3e-4])  # loaded whole, streamed
def test_a_model_folder_without_its_tokenizer_gets_a_one_line_error(tiny_dir, texts, tmp_path, max_memory):
    for file in tiny_dir.glob("tokenizer*"):
        file.unlink()
    with pytest.raises(PrunelabError, match=r"tiny-llama has no tokenizer files \(tokenizer.json,") as error:
        job(tiny_dir, texts, tmp_path / "out", max_memory=max_memory)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("max_memory", [None, 3e-4])  # loaded whole, streamed
def test_a_tokenizer_that_is_not_the_models_gets_a_one_line_error(tokenizer, texts, tmp_path, max_memory):
    folder = tmp_path / "small-vocabulary"
    tiny_model("llama", vocab_size=64).save_pretrained(folder)  # the tokenizer's ids go up to 255
    tokenizer.save_pretrained(folder)
    message = r"the calibration windows hold token id \d+, but the model's embeddings have 64 rows: the tokenizer of "
    with pytest.raises(PrunelabError, match=message + ".*small-vocabulary is not this model's") as error:
        job(folder, texts, tmp_path / "out", max_memory=max_memory)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()
    budget = [] if max_memory is None else ["--max-memory", str(max_memory)]
    result = runner.invoke(app, ["eval", "--model", str(folder), "--eval", str(texts[1]), "--eval-seqlen", "32",
                                 "--eval-windows", "4", *budget])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "the evaluation windows hold token id" in " ".join(result.output.split()), result.output
    with pytest.raises(PrunelabError, match=r"have 64 rows: the tokenizer given is not this model's"):
        prunelab.prune(tiny_model("llama", vocab_size=64), tokenizer, calibration=str(texts[0]), samples=8,
                       seqlen=32, progress=False)


def test_cli_too_short_calibration_and_empty_text(tiny_dir, texts, tmp_path):
    short, empty = tmp_path / "short.txt", tmp_path / "empty.txt"
    short.write_text("a few words only")
    empty.write_text("")
    for calib, message in [(short, "calibration text too short"), (empty, "is empty")]:
        result = runner.invoke(
            app,
            [
                "run", "--model", str(tiny_dir), "--calib", str(calib), "--eval", str(texts[1]), "--seqlen", "64",
                "--out", str(tmp_path / "o"),
            ],
        )
        assert result.exit_code == 2 and message in result.output
        assert not (tmp_path / "o").exists()


def test_config_file_yaml_and_toml_with_cli_override(tiny_dir, texts, tmp_path):
    calib, evaluation = texts
    settings = dict(
        model=str(tiny_dir),
        calib=str(calib),
        eval="none",
        samples=4,
        seqlen=16,
        method="magnitude",
        sparsity=0.3,
        sparsegpt={"damp": 0.05},
    )
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(settings))
    toml = (
        "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items() if k != "sparsegpt")
        + "\n[sparsegpt]\ndamp = 0.05\n"
    )
    (tmp_path / "run.toml").write_text(toml)
    for name in ("run.yaml", "run.toml"):
        out = tmp_path / f"out-{name}"
        result = runner.invoke(app, ["run", "--config", str(tmp_path / name), "--sparsity", "0.4", "--out", str(out)])
        assert result.exit_code == 0, result.output
        saved = json.loads((out / "prunelab.json").read_text())
        assert saved["config"]["sparsity"] == 0.4 and saved["config"]["method"] == "magnitude"
        assert saved["config"]["sparsegpt"]["damp"] == 0.05
        assert saved["sparsity"]["sparsity"] == pytest.approx(0.4, abs=0.01)


def test_config_file_with_unknown_key_is_rejected(tmp_path):
    (tmp_path / "bad.yaml").write_text("sparsty: 0.5\n")
    result = runner.invoke(app, ["run", "--config", str(tmp_path / "bad.yaml")])
    assert result.exit_code == 2 and "unknown config key(s): sparsty" in result.output


def test_eval_command_reports_perplexity_and_sparsity(tiny_dir, texts):
    result = runner.invoke(
        app,
        [
            "eval", "--model", str(tiny_dir), "--eval", str(texts[1]), "--eval-seqlen", "32", "--eval-windows", "3",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout[result.stdout.index("{") :])
    assert payload["windows"] == 3 and payload["perplexity"] > 1 and payload["sparsity"] < 0.01


@pytest.mark.parametrize("save_dtype, saved", [("auto", torch.bfloat16), ("float32", torch.float32)])
def test_a_bfloat16_model_keeps_its_dtype_and_is_measured_as_saved(tokenizer, texts, tmp_path, save_dtype, saved):
    folder, out = tmp_path / "bf16", tmp_path / "out"
    tiny_model("llama").to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # reconstruction trains the kept weights in float32: rounding them to bfloat16 changes the model
    report = job(folder, texts, out, method="wanda", save_dtype=save_dtype)
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {saved}
    assert report["model"]["saved_dtype"] == json.loads((out / "config.json").read_text())["dtype"] == str(saved)[6:]
    assert f"| saved to | {out} ({str(saved)[6:]}) |" in (out / "REPORT.md").read_text()
    result = runner.invoke(app, ["eval", "--model", str(out), "--eval", str(texts[1]), "--eval-seqlen", "32",
                                 "--eval-windows", "4", "--json"])
    assert result.exit_code == 0, result.output
    again = json.loads(result.stdout[result.stdout.index("{"):])["perplexity"]
    assert again == pytest.approx(report["metrics"]["pruned"]["perplexity"], rel=1e-6)


def test_report_records_every_stage_with_time_and_memory(tiny_dir, texts, tmp_path):
    job(tiny_dir, texts, tmp_path / "o", method="wanda")
    saved = json.loads((tmp_path / "o" / "prunelab.json").read_text())
    assert list(saved["stages"]) == ["data", "load", "windows", "eval_dense", "prune+reconstruct", "eval", "save"]
    for entry in saved["stages"].values():
        assert entry["seconds"] >= 0 and entry["peak_rss_gb"] > 0.1
    assert saved["versions"]["torch"] != "not installed" and "GLIBC_TUNABLES" in saved["versions"]


def test_reconstruction_flags_and_config_section_reach_the_run(tiny_dir, texts, tmp_path):
    calib, _ = texts
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"reconstruct": {"granularity": "block", "loss": "cosine"}}))
    out = tmp_path / "o"
    result = runner.invoke(
        app,
        [
            "run", "--config", str(tmp_path / "run.yaml"), "--model", str(tiny_dir), "--calib", str(calib), "--eval",
            "none", "--samples", "6", "--seqlen", "16", "--heldout", "2", "--lr", "0.002", "--batch-size", "3",
            "--epochs", "2", "--propagation", "mixed", "--freeze-norms", "--forward-batch", "4", "--out", str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "prunelab.json").read_text())
    rc = saved["config"]["reconstruct"]
    assert (
        rc["granularity"],
        rc["loss"],
        rc["lr"],
        rc["batch_size"],
        rc["epochs"],
        rc["propagation"],
        rc["freeze_norms"],
    ) == ("block", "cosine", 0.002, 3, 2, "mixed", True)
    assert saved["config"]["forward_batch"] == 4
    assert [r["steps"] for r in saved["reconstruction"]["submodels"]] == [4, 4]  # 2 blocks; 2 epochs × ceil(6 / 3)
    assert (out / "reconstruction_loss.png").exists()


def test_saved_tensors_are_read_as_safetensors_writes_them(tmp_path):
    """`read_tensors` reads a file without mapping it (so its pages do not count in the run's peak memory)."""
    from safetensors.torch import load_file, save_file

    from prunelab.evaluate.sparsity import read_tensors

    tensors = {"a": torch.randn(3, 5), "b": torch.randn(4, 2).to(torch.bfloat16), "c": torch.arange(6).reshape(2, 3),
               "d": torch.tensor([True, False]), "e": torch.zeros(0, 4), "f": torch.randn(2, 2, 2).half()}
    path = tmp_path / "t.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    expected = load_file(path)
    got = dict(read_tensors(path, {"a", "b", "c", "d", "e", "f", "absent"}))
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape and torch.equal(got[key], tensor), key
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError, match="truncated"):
        dict(read_tensors(path, set(tensors)))


def test_default_output_folders_tell_the_runs_apart():
    from prunelab.cli import default_out
    from prunelab.config import RunConfig

    folders = [default_out(RunConfig(**overrides)) for overrides in (
        {}, {"layerwise": "owl"}, {"skip": ["*.down_proj"]}, {"pattern": "2:4"}, {"reconstruct": "block"})]
    assert folders[0] == "runs/smollm2-wanda-50pct-attn-mlp"
    assert folders[1:3] == ["runs/smollm2-wanda-50pct-owl-attn-mlp", "runs/smollm2-wanda-50pct-skip-attn-mlp"]
    assert len(set(folders)) == len(folders)
