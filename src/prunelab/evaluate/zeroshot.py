"""Zero-shot multiple-choice accuracy, computed by lm-evaluation-harness on the model in memory.

For an example with context c, choices a_1 … a_k and gold index g, the harness scores

    acc       = [ argmax_i  log p(a_i | c)             = g ]
    acc_norm  = [ argmax_i  log p(a_i | c) / len(a_i)  = g ]     (normalised by the choice's characters)

and reports their means over the task's examples. prunelab's offline tasks (`bigbench`) are BIG-bench
multiple-choice tasks converted once from the cached bigbench sdist into JSON Lines files; their
lm-eval task YAMLs ship in `evaluate/tasks/`. Any other name is an lm-eval task and passes through
(it needs the hub for its data).
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import yaml

from ..assets import bigbench_members, cache_dir
from ..errors import PrunelabError
from ..files import atomic_dir

TASKS_DIR = Path(__file__).parent / "tasks"
# prunelab task -> the bigbench task.json files it joins (paths under benchmark_tasks/)
BIGBENCH_SOURCES = {
    "bb_social_iqa": ["social_iqa/task.json"],
    "bb_goal_step_wikihow": ["goal_step_wikihow/goal_inference/task.json",
                             "goal_step_wikihow/step_inference/task.json"],
    "bb_timedial": ["timedial/task.json"],
    "bb_truthful_qa_mc": ["truthful_qa/task_mc.json"],
    "bb_cause_and_effect": ["cause_and_effect/one_sentence/task.json", "cause_and_effect/two_sentences/task.json"],
}
OFFLINE_TASKS = tuple(BIGBENCH_SOURCES)
CONVERSION = "v1"  # the converted files' format; a new value converts again into a new folder
SHUFFLE_SEED = 1234  # the files are shuffled once, so that `limit` takes a sample, not the first topic
INSTALL = "pip install 'prunelab[eval]' (offline: pip download lm-eval on a connected machine, then pip install it)"


def task_names(spec: str) -> list[str]:
    """`bigbench` → the offline set; otherwise comma-separated names, in order, without repeats."""
    names: list[str] = []
    for part in (p.strip() for p in str(spec).split(",")):
        for name in OFFLINE_TASKS if part == "bigbench" else [part] if part else []:
            if name not in names:
                names.append(name)
    if not names:
        raise PrunelabError(f"tasks must name at least one task (bigbench, or lm-eval task names), got {spec!r}")
    return names


def check_tasks(names: list[str]) -> None:
    """lm-eval installed, every name known to prunelab or lm-eval; before any model is loaded."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise PrunelabError(f"zero-shot tasks need lm-eval, which is not installed: {INSTALL}") from None
    unknown = [n for n in names if n not in OFFLINE_TASKS and n not in lm_eval_tasks()]
    if unknown:
        raise PrunelabError(f"unknown task(s) {', '.join(unknown)}: neither prunelab's offline tasks "
                            f"({', '.join(OFFLINE_TASKS)}; all: bigbench) nor lm-eval tasks (lm-eval --tasks list)")


@functools.lru_cache(maxsize=1)
def lm_eval_tasks() -> frozenset[str]:
    """Every task name lm-eval knows (indexing its task folder takes ~10 s, hence once per process)."""
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager().all_tasks)


def bigbench_examples(task: dict) -> list[dict]:
    """BIG-bench task.json examples as {context, choices, gold}, the prompt built as BIG-bench declares
    it (task prefix, input prefix, input, output prefix); examples without a single best choice are left out."""
    head = (task.get("task_prefix") or "") + (task.get("example_input_prefix") or "")
    tail = task.get("example_output_prefix") or ""
    examples = []
    for example in task["examples"]:
        choices, scores = list(example["target_scores"]), list(example["target_scores"].values())
        if scores.count(max(scores)) != 1:
            continue
        examples.append({"context": (head + example["input"] + tail).lstrip(), "choices": choices,
                         "gold": scores.index(max(scores))})
    return examples


def offline_task_dir() -> Path:
    """The converted JSON Lines files of every offline task (converted once into the cache)."""
    final = cache_dir() / "tasks" / f"bigbench-mc-{CONVERSION}"
    if all((final / f"{name}.jsonl").is_file() for name in OFFLINE_TASKS):
        return final
    members = {m for sources in BIGBENCH_SOURCES.values() for m in sources}
    source = bigbench_members(cache_dir() / "text" / "bigbench-1.0.0-mc", members)
    with atomic_dir(final) as tmp:
        for name, files in BIGBENCH_SOURCES.items():
            examples = [e for f in files for e in bigbench_examples(json.loads((source / f).read_text("utf-8")))]
            random.Random(SHUFFLE_SEED).shuffle(examples)
            with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as out:
                out.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in examples)
    return final


def task_config(name: str, data_dir: Path) -> dict:
    """The shipped lm-eval YAML of an offline task, pointed at its converted file."""
    config = yaml.safe_load((TASKS_DIR / f"{name}.yaml").read_text())
    config["dataset_kwargs"]["data_files"]["test"] = str(data_dir / f"{name}.jsonl")
    return config


def zero_shot(model, tokenizer, names: list[str], limit: int, batch_size: int, data_dir: Path | None = None) -> dict:
    """acc and acc_norm of every task, their means, and the harness protocol (`limit`: examples per
    task, 0 = all; `data_dir`: where the offline tasks' files are, by default the converted cache)."""
    check_tasks(names)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    if any(n in OFFLINE_TASKS for n in names) and data_dir is None:
        data_dir = offline_task_dir()
    was_training = model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=[task_config(n, data_dir) if n in OFFLINE_TASKS else n for n in names], num_fewshot=0,
            limit=limit or None, log_samples=False, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    finally:
        model.train(was_training)
    result = summarise(out, names, limit, getattr(lm_eval, "__version__", "unknown"))
    for name in (n for n in names if n in OFFLINE_TASKS):
        result["tasks"][name]["chance"] = chance(data_dir / f"{name}.jsonl", limit)
    return result


def chance(path: Path, limit: int) -> float:
    """The accuracy of guessing: mean of 1 / choices over the examples scored (the file's first `limit`)."""
    with open(path, encoding="utf-8") as lines:
        counts = [len(json.loads(line)["choices"]) for number, line in enumerate(lines) if not limit or number < limit]
    return sum(1 / c for c in counts) / len(counts)


def summarise(out: dict, names: list[str], limit: int, version: str) -> dict:
    tasks = {}
    for name in names:
        result, samples = out["results"][name], out.get("n-samples", {}).get(name, {})
        tasks[name] = {"acc": result["acc,none"], "acc_stderr": result.get("acc_stderr,none"),
                       "acc_norm": result.get("acc_norm,none"), "acc_norm_stderr": result.get("acc_norm_stderr,none"),
                       "examples": samples.get("effective"), "examples_available": samples.get("original"),
                       "version": out["versions"].get(name), "fewshot": out.get("n-shot", {}).get(name, 0)}
    mean = {key: sum(t[key] for t in tasks.values()) / len(tasks) for key in ("acc", "acc_norm")
            if all(t[key] is not None for t in tasks.values())}
    return {"tasks": tasks, **{f"mean_{k}": v for k, v in mean.items()}, "harness": "lm-evaluation-harness",
            "harness_version": version, "limit": limit, "fewshot": 0,
            "offline_conversion": CONVERSION}
