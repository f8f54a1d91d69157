"""Bad input never corrupts anything: each class of bad input gets a one-line error naming the key or
file, before the expensive work where it can be checked, and nothing is lost or left behind."""

import errno
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import save_file
from tiny import random_ids, tiny_model
from typer.testing import CliRunner

import prunelab
from prunelab.cli import app
from prunelab.config import RunConfig
from prunelab.errors import PrunelabError
from prunelab.files import MARKER, atomic_dir
from prunelab.measure import python_argv
from prunelab.models.conv1d import released

runner = CliRunner()


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    text = " ".join(result.output.split())
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit), \
        result.output
    return result.exit_code, text


def base_args(tiny_dir, texts, out):
    calib, evaluation = texts
    return ["run", "--model", tiny_dir, "--calib", calib, "--eval", evaluation, "--samples", "4", "--seqlen", "16",
            "--eval-seqlen", "16", "--eval-windows", "2", "--out", out]


# --- 1. config values are type-checked, in files and in the API alike --------------------------------

@pytest.mark.parametrize("values, key", [
    ({"overwrite": "false"}, "overwrite must be true or false, got 'false'"),
    ({"sparsegpt": 5}, "sparsegpt must be a mapping"),
    ({"reconstruct": 5}, "reconstruct must be a mapping"),
    ({"reconstruct": {"lr_grid": "1e-3"}}, "reconstruct.lr_grid must be a list of finite numbers"),
    ({"model": 123}, "model must be a string, got 123"),
    ({"seed": "abc"}, "seed must be an integer, got 'abc'"),
    ({"threads": "2"}, "threads must be an integer or null, got '2'"),
    ({"samples": 4.5}, "samples must be an integer, got 4.5"),
    ({"eval_windows": 2.5}, "eval_windows must be an integer, got 2.5"),
    ({"threads": -1}, "threads must be a positive integer"),
    ({"threads": 10**9}, "threads 1000000000 is more than this machine's"),  # libgomp aborted the process
    ({"eval_seqlen": 1}, "eval_seqlen must be >= 2, got 1"),  # perplexity divided by 0 predicted tokens
    ({"seqlen": 1, "retrain": "full"}, "seqlen must be >= 2, got 1"),
    # AdamW multiplies each weight by 1 - lr x weight_decay: the loss became NaN, and the error blamed the lr
    ({"reconstruct": {"weight_decay": 1e9}}, "reconstruct.weight_decay 1e+09 x the learning rate 0.01 is >= 1"),
    ({"retrain": {"method": "full", "weight_decay": 1e5, "lr": 1e-4}},
     "retrain.weight_decay 100000 x the learning rate 0.0001 is >= 1: AdamW would multiply every weight by -9 each"),
    ({"out": ""}, "out must not be empty"),
    ({"reconstruct": {"freeze_norms": "no"}}, "reconstruct.freeze_norms must be true or false"),
    ({"depth": {"remove": True}}, "depth.remove must be an integer, got True"),
])
def test_config_values_of_the_wrong_type_are_refused_naming_the_key(values, key):
    with pytest.raises(PrunelabError) as raised:
        RunConfig.from_dict(values)
    assert key in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize("text, message", [
    # most range checks (damp < 0, weight_decay < 0, alpha <= 0) let a NaN through, and SparseGPT divided by it
    ("sparsegpt: {damp: .nan}", "sparsegpt.damp must be a finite number, got nan"),
    ("reconstruct: {weight_decay: .inf}", "reconstruct.weight_decay must be a finite number, got inf"),
    ("reconstruct: {lr: .inf}", "reconstruct.lr must be a finite number, got inf"),  # float | str
    ("retrain: {lr_grid: [1.0e-4, .nan]}", "retrain.lr_grid must be a list of finite numbers"),
    ("ria: {alpha: 1e999}", "ria.alpha must be a finite number, got inf"),  # a string to YAML, inf to float()
    ("max_memory: -.inf", "max_memory must be a finite number, got -inf"),
])
def test_nan_and_infinite_option_values_are_refused_naming_the_key(text, message):
    with pytest.raises(PrunelabError) as raised:
        RunConfig.from_dict(yaml.safe_load(text))
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_numbers_yaml_reads_as_strings_are_numbers():
    # PyYAML reads 1e-3 (no dot) as a string; a float option takes it as the number it spells
    cfg = RunConfig.from_dict(yaml.safe_load("reconstruct: {lr: 1e-3, lr_grid: [1e-4, 1e-3]}\nsparsity: 0.6"))
    assert cfg.reconstruct.lr == 1e-3 and cfg.reconstruct.lr_grid == (1e-4, 1e-3) and cfg.sparsity == 0.6


@pytest.mark.parametrize("values, message", [
    ({"pattern": "2:4", "sparsity": 0.3}, "sparsity 0.3 is ignored: pattern 2:4 keeps 2 of every 4 weights (50% "
                                          "sparsity)"),
    ({"pattern": "1:4", "sparsity": 0.6}, "(75% sparsity)"),
    ({"method": "layers", "depth": {"remove": 2}, "sparsity": 0.7}, "method layers removes depth.remove blocks"),
    ({"method": "flap", "sparsity": 0.2}, "method flap removes width.ratio"),
])
def test_a_sparsity_that_decides_nothing_is_said_to(values, message, recwarn):
    RunConfig.from_dict(values)
    said = [str(w.message) for w in recwarn if issubclass(w.category, prunelab.errors.PrunelabWarning)]
    assert len(said) == 1 and message in said[0]


@pytest.mark.parametrize("values", [{"pattern": "2:4"}, {"sparsity": 0.3}, {"method": "flap"}])
def test_a_sparsity_that_decides_is_not_warned_about(values, recwarn):
    RunConfig.from_dict(values)
    assert not [w for w in recwarn if issubclass(w.category, prunelab.errors.PrunelabWarning)]


@pytest.mark.parametrize("suffix, text", [(".yaml", 'overwrite: "false"\n'), (".toml", 'overwrite = "false"\n')])
def test_quoted_false_in_a_config_file_never_deletes_a_run(suffix, text, tiny_dir, texts, tmp_path):
    out = tmp_path / "run"
    assert cli(*base_args(tiny_dir, texts, out), "--reconstruct", "none")[0] == 0
    before = sorted(p.name for p in out.iterdir())
    config = tmp_path / f"run{suffix}"
    config.write_text(text)
    code, output = cli(*base_args(tiny_dir, texts, out), "--config", config)
    assert code == 2 and "overwrite must be true or false, got 'false' (a str)" in output
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.parametrize("args, message", [
    (["--lr-grid", "abc"], "--lr-grid must be a list of finite numbers"),
    (["--method", "sparsegpt", "--damp", "nan"], "sparsegpt.damp must be a finite number, got nan"),
    (["--threads", "-1"], "threads must be a positive integer"),
    (["--out", ""], "out must not be empty"),
    (["--permute"], "permute reorders channels so that an N:M pattern keeps more of each layer: it needs a pattern"),
    (["--lr", "fast"], "reconstruct.lr must be a positive number or 'auto', got 'fast'"),
    (["--device", "gpu7"], "unknown device 'gpu7'"),
    (["--device", "mps"], "device 'mps': prunelab runs on cpu, cuda or cuda:N"),  # torch knows it: a traceback
    (["--device", "meta"], "device 'meta': prunelab runs on cpu, cuda or cuda:N"),
    (["--device", f"cuda:{torch.cuda.device_count()}"],
     f"device 'cuda:{torch.cuda.device_count()}' does not exist" if torch.cuda.is_available()
     else f"device 'cuda:{torch.cuda.device_count()}' requested but CUDA is not available"),
])
def test_bad_flags_give_one_line_errors(args, message, tiny_dir, texts, tmp_path):
    code, output = cli(*base_args(tiny_dir, texts, tmp_path / "o"), *args)
    assert code == 2 and message in output
    assert not (tmp_path / "o").exists()


def test_a_runs_prunelab_json_redoes_the_run(tiny_dir, texts, tmp_path):
    first = tmp_path / "first"
    assert cli(*base_args(tiny_dir, texts, first), "--method", "magnitude", "--sparsity", "0.3", "--reconstruct",
               "none")[0] == 0
    again = tmp_path / "again"
    code, output = cli("run", "--config", first / "prunelab.json", "--out", again)
    assert code == 0, output
    one, two = (json.loads((d / "prunelab.json").read_text()) for d in (first, again))
    assert {k: v for k, v in one["config"].items() if k != "out"} == {
        k: v for k, v in two["config"].items() if k != "out"
    }
    assert one["metrics"]["pruned"]["perplexity"] == pytest.approx(two["metrics"]["pruned"]["perplexity"], rel=1e-6)


@pytest.mark.parametrize("name, content, flags, message", [
    ("run.yaml", "samples: [1\n", [], "cannot parse config file {file}: while parsing a flow sequence"),
    ("run.toml", "samples = \n", [], "cannot parse config file {file}: Invalid value"),
    ("run.json", "{bad", [], "cannot parse config file {file}: Expecting property name"),
    ("run.ini", "samples=1", [], "config file must be .yaml, .yml, .toml or a run's prunelab.json: {file}"),
    ("run.yaml", "- samples\n", [], "config file {file} must hold a mapping of option names to values"),
    ("run.yaml", "sample: 4\n", [], "{file}: unknown config key(s): sample; known:"),
    ("run.yaml", "sparsity: 2\n", [], "{file}: sparsity must be in [0, 1), got 2.0"),
    ("run.yaml", "sparsity: 2\n", ["--sparsity", "3"], "error: sparsity must be in [0, 1), got 3.0"),  # the flag's
    ("run.yaml", "method: flap\n", ["--pattern", "2:4"], "error: pattern 2:4 zeroes weights"),  # both together
    (None, None, [], "config file {file} is a folder, not a file"),
    ("missing.yaml", None, [], "config file not found: {file}"),
])
def test_a_bad_config_file_is_one_line_naming_the_file(name, content, flags, message, tmp_path, monkeypatch):
    import prunelab.job

    monkeypatch.setattr(prunelab.job, "load_model", lambda *a: pytest.fail("the model was loaded"))
    file = tmp_path / name if name else tmp_path
    if content is not None:
        file.write_text(content)
    code, output = cli("run", "--config", file, "--out", tmp_path / "o", *flags)
    assert code == 2 and message.format(file=file) in output, output
    assert not (tmp_path / "o").exists()


# --- 2. token ids through the API ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda ids: (ids, torch.zeros_like(ids)), "marks every token of window(s) [0, 1, 2, 3, 4] as padding"),
        (lambda ids: (ids + 1000, None), "outside the model's vocabulary [0, 256)"),
        (lambda ids: (ids.float(), None), "must hold integer token ids"),
        (lambda ids: (ids[0], None), "must be [windows, seqlen] token ids"),
        (lambda ids: (ids, torch.ones(8, 31, dtype=torch.long)), "attention_mask must have the shape of calibration"),
        (lambda ids: (ids, torch.full_like(ids, 2)), "1 at real tokens and 0 at padding"),
    ],
)
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_bad_token_ids_are_refused_and_the_model_is_untouched(make, message, method):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids, mask = make(random_ids(8, 32))
    with pytest.raises(PrunelabError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        prunelab.prune(model, calibration=ids, attention_mask=mask, method=method, reconstruct="none", progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_objects_where_names_or_numbers_go_are_named_by_their_type_in_one_line(tokenizer):
    model = tiny_model("llama")
    cases = [(lambda: prunelab.run(model=model), "prunelab.run loads its model by name or path (and saves it); prune"),
             (lambda: prunelab.run(calib=random_ids(4, 8)), "calib must be a string, got a Tensor"),
             (lambda: prunelab.run(reconstruct=model), "reconstruct must be a mapping of reconstruct options, got a L"),
             (lambda: prunelab.run(samples="x" * 200), "samples must be an integer, got a str"),
             (lambda: prunelab.run(samples="x"), "samples must be an integer, got 'x' (a str)"),
             (lambda: prunelab.prune(model, random_ids(24, 8)), "tokenizer must be the model's tokenizer, got a Tens")]
    for call, message in cases:
        with pytest.raises(PrunelabError) as error:  # the repr of a model or a tensor: dozens of lines
            call()
        assert str(error.value).startswith(message) and "\n" not in str(error.value), str(error.value)


@pytest.mark.parametrize("values, message", [
    ({"calib": "The text itself. " * 300}, r"unknown text source 'The text itself. The text itself. The te'\.\.\. "
                                          r"\(5100 characters\): not a file, .*; a text of your own goes in a .txt"),
    ({"eval": "a\nb"}, r"unknown text source 'a\\nb' \(3 characters\)"),
    ({"model": "m" * 5000}, r"model 'mmmm.*'\.\.\. \(5000 characters\) is neither a usable path \(File name too long"),
])
def test_a_text_where_a_name_goes_is_quoted_short(values, message, tmp_path):
    with pytest.raises(PrunelabError, match=message) as error:  # the whole text in the message; an OSError
        prunelab.run(out=str(tmp_path / "o"), progress=False, **values)
    assert len(str(error.value)) < 300 and "\n" not in str(error.value)


def test_a_model_given_as_a_name_not_in_memory_or_with_adapters_is_refused_by_the_api():
    with pytest.raises(PrunelabError, match=r"model must be a loaded model .*got a str; prunelab.run\(model=...\)"):
        prunelab.prune("HuggingFaceTB/SmolLM2-135M", calibration=random_ids(8, 32), progress=False)
    with torch.device("meta"):
        empty = tiny_model("llama")
    with pytest.raises(PrunelabError, match=r"weights are not in memory \(model.embed_tokens.weight is on the meta"):
        prunelab.prune(empty, calibration=random_ids(8, 32), progress=False)
    from peft import LoraConfig, get_peft_model

    tuned = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(PrunelabError, match=r"base_model.model.model.layers.0.self_attn.q_proj carries PEFT adapters: "
                                            r"merge them into the weights first \(merge_and_unload\(\)\)"):
        prunelab.prune(tuned, calibration=random_ids(8, 32), progress=False)  # it pruned LoRA's A and B as layers


@pytest.mark.parametrize("windows, options, message", [
    (lambda ids: ids.float(), {}, "windows must hold integer token ids"),
    (lambda ids: ids[0], {}, r"windows must be \[windows, seqlen\] token ids, got shape \(16,\)"),
    (lambda ids: ids[:0], {}, r"windows must be \[windows, seqlen\] token ids, got shape \(0, 16\)"),
    (lambda ids: ids + 1000, {}, r"windows holds token ids outside the model's vocabulary \[0, 256\)"),
    (lambda ids: ids[:, :1], {}, "windows must hold 2 tokens or more each"),
    (lambda ids: ids.tolist(), {}, "windows must be a tensor of token ids"),
    (lambda ids: ids, {"batch_size": 0}, "batch_size must be a positive integer, got 0"),
])
def test_bad_windows_for_perplexity_are_refused_in_one_line(windows, options, message):
    with pytest.raises(PrunelabError, match=message):  # were an IndexError, a ZeroDivisionError, a reshape error...
        prunelab.perplexity(tiny_model("llama"), windows(random_ids(4, 16)), progress=False, **options)


def test_perplexity_through_the_api_is_of_the_model_in_eval_mode():
    model, ids = tiny_model("llama", attention_dropout=0.5), random_ids(4, 16)
    expected = prunelab.perplexity(model.eval(), ids, progress=False)
    assert prunelab.perplexity(model.train(), ids, progress=False) == expected and model.training


# --- 3–7, 12. the output folder ----------------------------------------------------------------------


def test_overwrite_refuses_the_current_directory(tiny_dir, texts, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert cli(*base_args(tiny_dir, texts, run), "--reconstruct", "none")[0] == 0
    monkeypatch.chdir(run)
    code, output = cli(*base_args(tiny_dir, texts, "."), "--reconstruct", "none", "--overwrite")
    assert code == 2 and "it is (or holds) the current directory" in output
    assert (run / "prunelab.json").exists() and not list(tmp_path.glob(".*old-*"))


@pytest.mark.parametrize("args, message", [
    # a mistyped count: the OOM killer ended the run after the model had loaded
    (["--samples", "1000000000", "--reconstruct", "none"],
     r"samples 1000000000 calibration windows of 16 tokens take 4.1e\+03 GB as float32 activations \(hidden size 64\), "
     r"more than this machine's [\d.]+ GB of memory: lower --samples or --seqlen"),
    (["--samples", "1000000000"],  # reconstruction may put them in files
     r"samples 1000000000 \(and 16 held-out\) calibration windows .* GB of memory and free disk: lower"),
    (["--seqlen", "4096"], "seqlen 4096 exceeds the model's max_position_embeddings 1024"),
    (["--eval-bos"], "--eval-bos: the model's tokenizer has no BOS token"),
    (["--retrain", "full", "--retrain-tokens", "1000000000000"], r"retrain.tokens 1000000000000 take 8e\+03 GB as "
                                                                 r"token ids"),
])
def test_what_config_and_tokenizer_refuse_is_refused_before_the_model_loads(args, message, tiny_dir, texts,
                                                                             tmp_path, monkeypatch):
    import prunelab.job

    monkeypatch.setattr(prunelab.job, "load_model", lambda *a: pytest.fail("the model was loaded"))
    code, output = cli(*base_args(tiny_dir, texts, tmp_path / "o"), *args)
    assert code == 2 and re.search(message, output.replace("\n", " ")), output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (["--eval-seqlen", "4096"], "eval_seqlen 4096 exceeds the model's max_position_embeddings 1024"),
    (["--eval-bos"], "--eval-bos: the model's tokenizer has no BOS token"),
])
def test_prunelab_eval_refuses_windows_before_the_model_loads(args, message, tiny_dir, texts, monkeypatch):
    import prunelab.job

    monkeypatch.setattr(prunelab.job, "load_model", lambda *a: pytest.fail("the model was loaded"))
    code, output = cli("eval", "--model", tiny_dir, "--eval", texts[1], "--eval-windows", "2", *args)
    assert code == 2 and message in output, output


@pytest.mark.parametrize("command", ["run", "eval"])
@pytest.mark.parametrize("model, message", [
    ("/no/such/model", "model folder not found: /no/such/model"),
    ("/no/such/model.gguf", "model file not found: /no/such/model.gguf"),
    ("/", "not a model folder (no config.json): /"),
])
def test_a_model_path_that_holds_no_model_is_refused_before_the_texts_are_read(command, model, message, tmp_path,
                                                                               monkeypatch):
    import prunelab.job

    # a hub text (wikitext2) is fetched with the hub's retries, half a minute offline, before the model was looked at
    monkeypatch.setattr(prunelab.job, "load_text", lambda *a, **k: pytest.fail("a text was read"))
    run = ["--calib", "wikitext2", "--out", tmp_path / "o"] if command == "run" else []
    code, output = cli(command, "--model", model, "--eval", "wikitext2", *run)
    assert code == 2 and message in output, output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # GPT-2: Conv1D layers, held as linears on the meta device too
@pytest.mark.parametrize("args, message", [
    (["--skip", "model.layers.9.*"], "skip pattern 'model.layers.9.*' matches no prunable layer"),
    (["--pattern", "3:7"], "pattern 3:7 does not divide layer 0."),
])
def test_layer_patterns_are_checked_before_the_model_loads(family, args, message, tokenizer, texts, tmp_path,
                                                           monkeypatch):
    import prunelab.job

    folder = tmp_path / family
    with released(model := tiny_model(family)):
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    monkeypatch.setattr(prunelab.job, "load_model", lambda *a: pytest.fail("the model was loaded"))
    skip = ["--skip", "transformer.h.9.*"] if family == "gpt2" and args[0] == "--skip" else args
    code, output = cli(*base_args(folder, texts, tmp_path / "o"), *skip)
    assert code == 2 and message.replace("model.layers", "transformer.h" if family == "gpt2" else "model.layers") \
        in output, output
    assert not (tmp_path / "o").exists()


def test_unwritable_output_is_refused_before_the_model_loads(tiny_dir, texts, tmp_path, monkeypatch):
    import prunelab.job

    monkeypatch.setattr(prunelab.job, "load_model", lambda *a: pytest.fail("the model was loaded"))
    (tmp_path / "file").write_text("x")
    code, output = cli(*base_args(tiny_dir, texts, tmp_path / "file"), "--overwrite")
    assert code == 2 and "exists and is not a folder" in output
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        code, output = cli(*base_args(tiny_dir, texts, locked / "out"))
        assert code == 2 and "is not a writable folder" in output
    finally:
        locked.chmod(0o700)


def test_a_read_only_file_system_is_found_before_the_model_loads(tiny_dir, texts, tmp_path, monkeypatch):
    import prunelab.files
    import prunelab.job

    monkeypatch.setattr(prunelab.job, "load_model", lambda *a: pytest.fail("the model was loaded"))

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(prunelab.files.tempfile, "mkdtemp", read_only)  # what a read-only mount answers, even root
    code, output = cli(*base_args(tiny_dir, texts, tmp_path / "out"))
    assert code == 2 and "cannot write the output folder" in output and "Read-only file system" in output


def test_disk_full_while_saving_is_one_line_and_keeps_the_old_run(tiny_dir, texts, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert cli(*base_args(tiny_dir, texts, run), "--reconstruct", "none")[0] == 0
    before = (run / "model.safetensors").read_bytes()

    def full(self, folder, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", full)
    code, output = cli(*base_args(tiny_dir, texts, run), "--reconstruct", "none", "--overwrite")
    assert code == 2 and "no space left on the device while writing" in output
    assert (run / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_temporaries_of_dead_runs_are_cleaned_and_outputs_are_readable(tmp_path):
    final = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / ".out.tmp-abc"
    stale.mkdir()
    (stale / MARKER).write_text(str(dead.pid))
    (stale / "model.safetensors").write_text("half")
    alive = tmp_path / ".out.tmp-live"  # a run still going (this process) is left alone
    alive.mkdir()
    (alive / MARKER).write_text(str(os.getpid()))
    old_umask = os.umask(0o022)
    try:
        with atomic_dir(final) as tmp:
            (tmp / "x").write_text("y")
            save_file({"w": torch.zeros(2)}, tmp / "model.safetensors")  # safetensors 0.8 writes 0600
    finally:
        os.umask(old_umask)
    assert (final / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert not stale.exists() and alive.exists()
    assert (final.stat().st_mode & 0o777) == 0o755


def test_empty_out_refused_by_the_api():
    with pytest.raises(PrunelabError, match="out must not be empty"):
        prunelab.run(out="")


def test_an_out_under_home_in_a_config_file_lands_under_home(tiny_dir, texts, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text("out: ~/runs/first\nreconstruct: none\n")  # no shell to expand it
    code, output = cli(*base_args(tiny_dir, texts, None)[:-2], "--config", config)
    assert code == 0, output
    assert (tmp_path / "home" / "runs" / "first" / "prunelab.json").is_file() and not (tmp_path / "~").exists()
    report = json.loads((tmp_path / "home" / "runs" / "first" / "prunelab.json").read_text())
    assert report["config"]["out"] == str(tmp_path / "home" / "runs" / "first")


# --- 5. the allocator re-exec does not run files of the current directory -----------------------------


def test_relaunch_ignores_modules_in_the_current_directory(tmp_path):
    (tmp_path / "typer.py").write_text("open('executed', 'w').write('yes')\n")
    done = subprocess.run(
        [*python_argv("import typer; print(typer.__file__)")], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0 and not (tmp_path / "executed").exists()
    assert str(tmp_path) not in done.stdout


# --- 8, 10. data and model files, checked before the expensive work -----------------------------------

@pytest.mark.parametrize("cache, message", [
    ("file", "it exists and is not a folder"),
    ("file/below", "Not a directory"),
])
def test_a_cache_folder_that_cannot_be_one_is_one_line(cache, message, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path / cache))
    code, output = cli("run", "--calib", "enwiki", "--out", tmp_path / "o")  # the embedded model and text
    assert code == 2 and f"cannot use the cache folder {tmp_path / cache} (PRUNELAB_CACHE): {message}" in output, \
        output
    assert not (tmp_path / "o").exists()


def test_a_name_that_is_neither_a_local_model_nor_on_the_hub_is_named_as_such(texts, tmp_path):
    # a mistyped local folder is taken for a hub id: the error named the tokenizer, after the hub's retries
    calib, evaluation = texts
    done = subprocess.run([sys.executable, "-m", "prunelab", "run", "--model", "no-such-model-folder", "--calib", calib,
                           "--eval", evaluation, "--out", tmp_path / "o"], capture_output=True, text=True,
                          cwd=tmp_path, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert ("error: model 'no-such-model-folder': no local folder or file of that name, and the Hugging Face hub "
            "gave no config for it (") in done.stderr
    assert not (tmp_path / "o").exists()



@pytest.mark.parametrize("stream", [[], ["--max-memory", "0.0006"]])
@pytest.mark.parametrize("family, args, message", [
    ("bloom", ["--method", "flap"], "BloomBlock: with a head removed its attention"),  # (ALiBi: the model's heads)
    ("mixtral", ["--method", "flap"], "routes tokens to experts"),
    ("llama", ["--method", "layers", "--remove", "2"], "cannot remove 2 of 2 blocks"),
])
def test_a_structured_method_the_model_cannot_take_is_refused_before_evaluation(
        family, args, message, stream, tokenizer, texts, tmp_path, monkeypatch):
    import prunelab.job

    folder = tmp_path / family
    tiny_model(family).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    for evaluation in ("perplexity", "streamed_perplexity"):
        monkeypatch.setattr(prunelab.job, evaluation, lambda *a, **k: pytest.fail("the dense model was evaluated"))
    code, output = cli(*base_args(folder, texts, tmp_path / "out"), *args, *stream)
    assert code == 2 and message in output, output
    assert not (tmp_path / "out").exists()

@pytest.mark.parametrize(
    "name, content, message",
    [
        ("binary.txt", b"\x00\x01\xff\xfe" * 100, "is not UTF-8 text"),
        ("numbers.jsonl", b'{"text": 5}\n', "expected a JSON object with a 'text' string"),
        ("fake.parquet", b"not parquet at all", "is not a readable Parquet file"),
    ],
)
def test_bad_calibration_files_fail_before_the_model_loads(name, content, message, tiny_dir, texts, tmp_path,
                                                           monkeypatch):
    import prunelab.job

    bad = tmp_path / name
    bad.write_bytes(content)
    monkeypatch.setattr(prunelab.job, "load_model", lambda *a: pytest.fail("the model was loaded"))
    code, output = cli("run", "--model", tiny_dir, "--calib", bad, "--eval", texts[1], "--out", tmp_path / "o")
    assert code == 2 and message in output and str(bad) in output


def test_corrupt_safetensors_is_one_line_in_run_and_eval(tiny_dir, texts, tmp_path):
    weights = tiny_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, output = cli(*base_args(tiny_dir, texts, tmp_path / "o"))
    assert code == 2 and "cannot load model" in output and "model.safetensors" in output
    code, output = cli("eval", "--model", tiny_dir, "--eval", texts[1], "--eval-seqlen", "16")
    assert code == 2 and "cannot load model" in output


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_a_config_json_that_is_not_an_object_is_one_line(text, tiny_dir, texts, tmp_path):
    (tiny_dir / "config.json").write_text(text)
    code, output = cli(*base_args(tiny_dir, texts, tmp_path / "out"))
    assert code == 2 and "its config.json is not a JSON object" in output
    assert not (tmp_path / "out").exists()


def test_windows_longer_than_the_model_allows_are_refused(tiny_dir, texts, tmp_path):
    code, output = cli(*base_args(tiny_dir, texts, tmp_path / "o"), "--eval-seqlen", "4096")
    assert code == 2 and "eval_seqlen 4096 exceeds the model's max_position_embeddings 1024" in output


def test_a_copy_of_the_calibration_text_is_not_evaluation_text(tiny_dir, texts, tmp_path):
    copy = tmp_path / "copy.txt"
    copy.write_bytes(texts[0].read_bytes())
    code, output = cli(*base_args(tiny_dir, (texts[0], copy), tmp_path / "o"))
    assert code == 2 and "hold the same text" in output


def test_nan_weights_are_refused_even_for_magnitude(tiny_dir, texts, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tiny_dir)
    code, output = cli(*base_args(tiny_dir, texts, tmp_path / "o"), "--method", "magnitude", "--reconstruct", "none")
    assert code == 2 and "model.layers.1.mlp.up_proj.weight holds NaN or inf" in output
    assert not (tmp_path / "o").exists()


def test_heldout_zero_is_fine_without_reconstruction():
    assert RunConfig(reconstruct={"granularity": "none", "heldout": 0}).reconstruct.heldout == 0
    with pytest.raises(PrunelabError, match="reconstruct.heldout must be >= 1"):
        RunConfig(reconstruct={"heldout": 0})


def test_two_processes_making_the_same_cache_entry_wait_for_each_other(tmp_path):
    """Two test runs starting together on a fresh machine both convert the embedded model: the second
    must find the first one's result, not fail on the folder it made."""
    import threading
    import time

    from prunelab.files import atomic_dir, cache_lock

    final, made, errors = tmp_path / "models" / "entry", [], []

    def make():
        try:
            with cache_lock(final):
                if (final / "weights").exists():
                    return
                with atomic_dir(final) as tmp:
                    time.sleep(0.3)
                    (tmp / "weights").write_text("1")
                    made.append(threading.get_ident())
        except Exception as exc:  # a thread's exception would not reach the test otherwise
            errors.append(exc)

    threads = [threading.Thread(target=make) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(made) == 1
    assert (final / "weights").read_text() == "1"
