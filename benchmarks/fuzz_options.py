"""Random combinations of options on tiny models built from configs: does any crash, or break what a run promises?

    PYTHONPATH=src python benchmarks/fuzz_options.py --mode api --seconds 540 --seed 1
    PYTHONPATH=src python benchmarks/fuzz_options.py --mode job --seconds 540 --seed 1
    PYTHONPATH=src python benchmarks/fuzz_options.py --mode api --seed 1 --case 213   # one drawn case again

`api`: `prunelab.prune` on a tiny model of any family in tests/tiny.py, held in float32, bfloat16 or float16: any
method, sparsity, N:M pattern (with or without permutation), OWL, skip patterns; any reconstruction granularity,
propagation, loss, precision and batch size; now and then a padded window. Checks: finite weights, each weight in
the dtype it had (a bfloat16 DeepSeek-V3 keeps its router in float32, as `from_pretrained` gives it), and the
sparsity asked for is the one measured.
`job`: `prunelab.run` on a tiny saved model (stored in float32 or bfloat16, sharded), held in either, saved in any
dtype, loaded whole or streamed, with or without reconstruction and retraining. Checks: the saved tensors are in the
reported dtype (or float32, where the model's class keeps them so), `prunelab eval` of the output gives the report's
perplexity, the saved sparsity.
`resume`: such a run (a zero-weight method, loaded or streamed) stopped as by kill -9 after its k-th checkpoint, then
resumed: the weights and perplexity are the uninterrupted run's, bit for bit.

A PrunelabError is a refusal: counted, its line printed. Anything else is a failure, printed with its traceback;
the exit status is 1 when there is one. Each case is drawn from (seed, case number), so `--case` repeats it.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny import FAMILIES  # noqa: E402

import prunelab  # noqa: E402
from prunelab.config import RunConfig  # noqa: E402
from prunelab.errors import PrunelabError  # noqa: E402
from prunelab.job import evaluate_model  # noqa: E402
from prunelab.models.conv1d import released  # noqa: E402

SKIPS = ["*.mlp.*", "*.self_attn.o_proj", "model.layers.0.*", "*down*"]


def draw_pruning(rng: random.Random, structured_options: bool) -> dict:
    method = rng.choice(["magnitude", "wanda", "sparsegpt", "ria", "layers", "flap"])
    options: dict = {"method": method}
    if method == "layers":
        options["depth"] = {"remove": 1, "metric": rng.choice(["bi", "cl", "taylor", "mag", "ppl"])}
        if structured_options:
            options["depth"].update(compensation=rng.random() < 0.7, protect_first=0, protect_last=0)
    elif method == "flap":
        options["width"] = {"ratio": rng.choice([0.1, 0.3, 0.5])}
        if structured_options:
            options["width"].update(structure=rng.choice(["adaptive", "uniform"]),
                                    bias_compensation=rng.random() < 0.7)
    elif rng.random() < 0.3:
        options["pattern"] = rng.choice(["2:4", "4:8", "1:4"])
        options["permute"] = rng.random() < 0.4
    else:
        options["sparsity"] = rng.choice([0.0, 0.3, 0.5, 0.7, 0.9])
        if rng.random() < 0.2:
            options["layerwise"] = "owl"
    if method not in ("layers", "flap") and rng.random() < 0.2:
        options["skip"] = [rng.choice(SKIPS)]
    return options


def draw_reconstruction(rng: random.Random) -> dict:
    granularity = rng.choice(["attn-mlp", "matrix", "block", "blocks:2", "model", "none", "none"])
    if granularity == "none":
        return {"granularity": "none"}
    return {"granularity": granularity, "propagation": rng.choice(["dense", "sparse", "mixed"]),
            "loss": rng.choice(["mse", "cmse", "nmse", "cosine"]), "lr": rng.choice([1e-3, "auto"]),
            "freeze_norms": rng.random() < 0.3, "heldout": 2, "lr_probe": 1, "batch_size": rng.choice([1, 2]),
            "precision": rng.choice(["auto", "float32", "bfloat16"])}


def check_sparsity(options: dict, measured: dict | None) -> None:
    """The sparsity measured is the one asked for, where the options say one (no skip, no OWL: 2 % apart)."""
    if options["method"] in ("layers", "flap") or options.get("skip") or "layerwise" in options:
        return
    n, _, m = options.get("pattern", "").partition(":")
    asked = 1 - int(n) / int(m) if m else options["sparsity"]
    if abs(measured["sparsity"] - asked) > 0.02:
        raise AssertionError(f"sparsity {measured['sparsity']} measured, {asked} asked")


def api_case(rng: random.Random, work: Path) -> None:  # noqa: ARG001 (job_case's signature)
    from tiny import as_loaded_in_bfloat16, tiny_model

    family, dtype = rng.choice(FAMILIES), rng.choice([torch.float32, torch.float32, torch.bfloat16, torch.float16])
    options = draw_pruning(rng, structured_options=True)
    options["reconstruct"] = draw_reconstruction(rng)
    if options["reconstruct"]["granularity"] == "none" and "sparsity" in options and rng.random() < 0.3:
        options["dtype"] = rng.choice(["bfloat16", "float16"])
    samples, seqlen = rng.choice([4, 8]), rng.choice([16, 32])
    extra = 2 if options["reconstruct"]["granularity"] != "none" else 0
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    ids = torch.randint(0, 256, (samples + extra, seqlen), generator=generator)
    mask = None
    # DeepSeek-V3's tiny config groups its heads, which its attention fails to do beside any padding mask
    if rng.random() < 0.2 and family != "deepseek_v3":
        mask = torch.ones_like(ids)
        mask[0, :4] = 0
    # a caller's own state: its model in train mode, its code under no_grad or inference_mode
    training, ambient = rng.random() < 0.2, rng.choice([nullcontext, nullcontext, torch.no_grad, torch.inference_mode])
    print(f"{family} {str(dtype)[6:]} padded={mask is not None} train={training} {ambient.__name__} {options}",
          end=" ", flush=True)
    model = tiny_model(family, layers=rng.choice([2, 3])).train(training)
    model = as_loaded_in_bfloat16(model) if dtype == torch.bfloat16 else model.to(dtype)  # a float32 router
    held = {name: p.dtype for name, p in model.named_parameters()}
    with ambient():
        result = prunelab.prune(model, calibration=ids, attention_mask=mask, progress=False, forward_batch=4,
                                **options)
    if model.training != training:
        raise AssertionError(f"the model's train mode was {training}, is now {model.training}")
    broken = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if broken:
        raise AssertionError(f"non-finite {broken[0]}")
    recast = [name for name, p in model.named_parameters() if name in held and p.dtype != held[name]]
    if recast:
        raise AssertionError(f"{recast[0]} was {held[recast[0]]}, is now {model.get_parameter(recast[0]).dtype}")
    check_sparsity(options, result["sparsity"])


def saved_model(work: Path, family: str, stored: torch.dtype) -> Path:
    from conftest import make_tokenizer
    from tiny import tiny_model

    folder = work / f"{family}-{str(stored)[6:]}"
    if not folder.exists():
        model = tiny_model(family, layers=3).to(stored)
        with released(model):  # GPT-2's Conv1D layers as its checkpoints store them
            model.save_pretrained(folder, max_shard_size="100KB")
        make_tokenizer().save_pretrained(folder)
    return folder


def job_case(rng: random.Random, work: Path) -> None:
    family, stored = rng.choice(FAMILIES), rng.choice([torch.float32, torch.bfloat16])
    options = draw_pruning(rng, structured_options=False)
    held = rng.choice(["float32", "float32", "bfloat16"])
    options.update(samples=rng.choice([4, 8]), seqlen=32, eval_seqlen=32, eval_windows=2, forward_batch=4, speed=False,
                   model_dtype=held, save_dtype=rng.choice(["auto", "auto", "float32", "bfloat16"]),
                   reconstruct={"granularity": rng.choice(["attn-mlp", "none", "block", "matrix"]), "heldout": 2,
                                "lr": rng.choice([1e-3, "auto"]), "lr_probe": 1,
                                "precision": rng.choice(["auto", "float32"])})
    if rng.random() < 0.25:  # streamed: more than a block of these models, less than the model
        options["max_memory"] = 3e-4 / (2 if held == "bfloat16" else 1)
    if rng.random() < 0.15:
        options["retrain"] = {"method": rng.choice(["full", "masklora"]), "tokens": 256, "heldout": 2,
                              "batch_size": 2, "accumulate": 1, "lr": 1e-3, "evals": 1}
    print(f"{family} stored {str(stored)[6:]} {options}", end=" ", flush=True)
    out, texts = work / "out", {"calib": work / "calib.txt", "eval": work / "eval.txt"}
    try:
        report = prunelab.run(dict(model=str(saved_model(work, family, stored)), calib=str(texts["calib"]),
                                   eval=str(texts["eval"]), out=str(out), overwrite=True, **options), progress=False)
        check_saved_dtypes(out, getattr(torch, report["model"]["saved_dtype"]))
        again = evaluate_model(RunConfig.from_dict(dict(model=str(out), eval=str(texts["eval"]), eval_seqlen=32,
                                                        eval_windows=2, device="cpu", model_dtype=held)))
        reported = report["metrics"]["pruned"]["perplexity"]
        if abs(again["perplexity"] - reported) > (1e-2 if held == "bfloat16" else 1e-4) * reported:
            raise AssertionError(f"prunelab eval of the output gives {again['perplexity']}, the report {reported}")
        check_sparsity(options, report["sparsity"])
    finally:
        shutil.rmtree(out, ignore_errors=True)


def check_saved_dtypes(out: Path, reported: torch.dtype) -> None:
    """Every float tensor saved in the reported dtype, but for those the model's class keeps in float32."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from prunelab.models.loading import held_dtypes

    with init_empty_weights():
        dtypes = held_dtypes(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out)), reported)
    for file in out.glob("*.safetensors"):
        for name, tensor in load_file(file).items():
            if tensor.is_floating_point() and tensor.dtype != dtypes(name):
                raise AssertionError(f"{name} saved in {tensor.dtype}, reported {reported}")


class Crash(BaseException):
    """kill -9 in the process: nothing in the job catches it or cleans up after it."""


def resume_case(rng: random.Random, work: Path) -> None:
    """A run killed after its k-th checkpoint and resumed writes what the uninterrupted run writes, bit for bit."""
    from prunelab.resume import Checkpoints

    family, stored = rng.choice(FAMILIES), rng.choice([torch.float32, torch.bfloat16])
    options = draw_pruning(rng, structured_options=False)
    options.pop("skip", None)
    if options["method"] in ("layers", "flap"):  # resume is for the zero-weight methods
        options = {"method": "wanda", "sparsity": 0.5}
    held = rng.choice(["float32", "float32", "bfloat16"])
    options.update(samples=8, seqlen=32, eval_seqlen=32, eval_windows=2, forward_batch=4, model_dtype=held,
                   reconstruct={"granularity": rng.choice(["attn-mlp", "none", "block"]), "heldout": 2,
                                "lr": rng.choice([1e-3, "auto"]), "lr_probe": 2, "precision": "float32"})
    if rng.random() < 0.3:
        options["max_memory"] = 3e-4 / (2 if held == "bfloat16" else 1)
    crash_at = rng.randint(1, 3)
    print(f"{family} stored {str(stored)[6:]} crash at checkpoint {crash_at} {options}", end=" ", flush=True)
    base = dict(model=str(saved_model(work, family, stored)), calib=str(work / "calib.txt"),
                eval=str(work / "eval.txt"), **options)
    save, every, written = Checkpoints.save, Checkpoints.every_seconds, []

    def save_then_crash(self, *args, **kwargs):
        save(self, *args, **kwargs)
        written.append(1)
        if len(written) == crash_at:
            raise Crash

    try:
        Checkpoints.every_seconds = 0.0  # a checkpoint after every step
        whole = prunelab.run(dict(base, out=str(work / "whole")), progress=False)
        Checkpoints.save = save_then_crash
        try:
            prunelab.run(dict(base, out=str(work / "crashed")), progress=False)
        except Crash:
            pass
        Checkpoints.save = save
        print("resumed" if len(written) == crash_at else f"finished after {len(written)} checkpoints", end=" ")
        resumed = prunelab.run(dict(base, out=str(work / "crashed"), resume=len(written) == crash_at,
                                    overwrite=len(written) < crash_at), progress=False)
        expected, got = (state(work / name) for name in ("whole", "crashed"))
        moved = [k for k in expected if not expected[k].equal(got[k])]
        if expected.keys() != got.keys() or moved:
            raise AssertionError(f"resumed weights differ: {moved[:3]}")
        if resumed["metrics"]["pruned"] != whole["metrics"]["pruned"]:
            raise AssertionError(f"resumed {resumed['metrics']['pruned']}, uninterrupted {whole['metrics']['pruned']}")
    finally:
        Checkpoints.save, Checkpoints.every_seconds = save, every
        for name in ("whole", "crashed", ".crashed.resume"):
            shutil.rmtree(work / name, ignore_errors=True)


def ddp_case(rng: random.Random, work: Path) -> None:
    """Two gloo processes under torchrun against one on the same options: the same masks (or removed blocks and
    channels), perplexity within 0.5 %."""
    import json
    import subprocess

    import yaml

    family, stored = rng.choice(FAMILIES), rng.choice([torch.float32, torch.bfloat16])
    options = draw_pruning(rng, structured_options=False)
    options.update(samples=8, seqlen=32, eval_seqlen=32, eval_windows=4, forward_batch=2, speed=False,
                   eval_dense=False, model_dtype=rng.choice(["float32", "bfloat16"]),
                   reconstruct={"granularity": rng.choice(["attn-mlp", "none", "block"]), "heldout": 2, "lr": 1e-3,
                                "precision": "float32", "batch_size": 2})
    if rng.random() < 0.3:
        options["max_memory"] = 3e-4 / (2 if options["model_dtype"] == "bfloat16" else 1)
    print(f"{family} stored {str(stored)[6:]} {options}", end=" ", flush=True)
    config = work / "run.yaml"
    config.write_text(yaml.safe_dump(dict(model=str(saved_model(work, family, stored)), calib=str(work / "calib.txt"),
                                          eval=str(work / "eval.txt"), **options)))
    try:
        prunelab.run(RunConfig.from_file(config, out=str(work / "one")), progress=False)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "-m", "prunelab", "run", "--config", str(config), "--out", str(work / "two")],
                              env=env, capture_output=True, text=True, timeout=600)
        if done.returncode:
            raise AssertionError(f"one process ran, two failed: {done.stderr.strip().splitlines()[-1]}")
        one, two = (json.loads((work / name / "prunelab.json").read_text()) for name in ("one", "two"))
        a, b = state(work / "one"), state(work / "two")
        if {k: t.shape for k, t in a.items()} != {k: t.shape for k, t in b.items()}:
            raise AssertionError("the two outputs differ in shape (other blocks, heads or channels removed)")
        # fused experts are saved per expert under other names: compare what was saved
        differ = sum(int(((a[k] == 0) != (b[k] == 0)).sum()) for k in a if a[k].is_floating_point())
        total = sum(a[k].numel() for k in a)
        # summed in another order, the statistics of two processes differ in their last bits, which can tip a
        # near-tie (SparseGPT: 4 of 127424 entries); a model held in bfloat16 differs as much in one process
        # between forward batch sizes (7 % of a 1:4 phi3's entries), so only float32 is held to it
        exact = options["reconstruct"]["granularity"] == "none" and options["model_dtype"] == "float32"
        if exact and differ > 1e-3 * total:
            raise AssertionError(f"{differ} of {total} zero entries differ")
        ppl = one["metrics"]["pruned"]["perplexity"], two["metrics"]["pruned"]["perplexity"]
        if abs(ppl[1] / ppl[0] - 1) > 0.005:
            raise AssertionError(f"perplexity {ppl[0]} in one process, {ppl[1]} in two")
    finally:
        for name in ("one", "two"):
            shutil.rmtree(work / name, ignore_errors=True)


# values an option may be given, right or wrong for it: each option of a drawn case gets one of its type's, or any
STRINGS = ["", " ", "abc", "none", "auto", "2:4", "1:1", "4:2", "0:4", "blocks:0", "blocks:3", "cuda", "cuda:7", "cpu",
           "/nonexistent/x", "wanda", "sparsegpt", "layers", "flap", "attn-mlp", "block", "matrix", "model", "owl",
           "adaptive", "full", "masklora", "float16", "bfloat16", "dense", "sparse", "cmse", "cosine", "ppl", "on",
           "all", "standard", "1e-3", "false", "mps", "meta", "~", "."]
VALUES = {int: [0, -1, 1, 2, 3, 10**9, 2.5, "3", True, None],
          float: [0.0, -0.5, 0.5, 0.999, 1.0, 1.5, 1e-12, 1e9, "1e-3", "abc", float("nan"), float("inf"), True, None],
          str: STRINGS + [5, None, ["x"]],
          bool: [True, False, "false", "yes", 0, 1, None],
          tuple: [[], [0.0], [-1e-3], ["*"], ["", "x"], ["model.layers.99.*"], "1e-3", [1e-3, "abc"], [float("nan")]]}


def option_paths(cls=None, prefix: tuple = ()) -> list[tuple[tuple[str, ...], type]]:
    """Every option of the run config as (path of keys, the type its values are drawn from)."""
    import dataclasses
    import typing

    from prunelab.config import Checked

    found = []
    for f in dataclasses.fields(cls or RunConfig):
        hint = typing.get_type_hints(cls or RunConfig)[f.name]
        if isinstance(hint, type) and issubclass(hint, Checked):
            found += option_paths(hint, (*prefix, f.name))
            continue
        args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        kind = next((k for k in (bool, int, float, str) if k in args), tuple)
        found.append(((*prefix, f.name), kind))
    return found


def inputs_case(rng: random.Random, work: Path) -> None:
    """One or two options of a small valid job given a value from a pool of right and wrong ones: the run either
    works, or refuses in one line and leaves no output folder behind. A refusal after the model was loaded is
    printed for a reader to judge whether it could have come before."""
    import prunelab.job

    family = rng.choice(["llama", "qwen3_moe", "gpt2"])
    model = saved_model(work, family, torch.float32)
    values = dict(model=str(model), calib=str(work / "calib.txt"), eval=str(work / "eval.txt"), samples=4, seqlen=32,
                  eval_seqlen=32, eval_windows=2, forward_batch=4, speed=False, out=str(work / "case"),
                  reconstruct={"heldout": 2, "lr_probe": 1, "lr": 1e-3, "precision": "float32"},
                  retrain={"tokens": 256, "heldout": 2, "batch_size": 2, "accumulate": 1, "lr": 1e-3, "evals": 1})
    mutated = {}
    for path, kind in rng.sample(option_paths(), rng.choice([1, 2])):
        pool = VALUES[kind] + [str(model), str(work), str(work / "calib.txt")] * (kind is str)
        value = rng.choice(pool) if rng.random() < 0.8 else rng.choice([v for p in VALUES.values() for v in p])
        section = values
        for key in path[:-1]:
            section = section.setdefault(key, {})
        section[path[-1]] = mutated[".".join(path)] = value
    print(f"{family} {' '.join(f'{k}={v!r}' for k, v in mutated.items())}", end=" ", flush=True)
    loads, load = [], prunelab.job.load_model
    prunelab.job.load_model = lambda *args, **kwargs: loads.append(1) or load(*args, **kwargs)
    signal.signal(signal.SIGALRM, _too_slow)
    signal.alarm(60)
    try:
        prunelab.run(values, progress=False)
    except Slow:
        raise PrunelabError("still running after 60 s (an option asked for that much work): stopped") from None
    except PrunelabError as error:
        if "\n" in str(error):
            raise AssertionError(f"a refusal of {len(str(error).splitlines())} lines: {error!r}") from error
        if (work / "case").exists() and values.get("resume") is not True:
            raise AssertionError(f"refused ({error}), but {work / 'case'} was left behind") from error
        raise PrunelabError(f"{'(after loading the model) ' if loads else ''}{error}") from error
    finally:
        signal.alarm(0)
        prunelab.job.load_model = load
        shutil.rmtree(work / "case", ignore_errors=True)


class Slow(BaseException):
    """A case that runs too long: stopped, neither a refusal of prunelab's nor a failure."""


def _too_slow(*_):
    raise Slow


def state(folder: Path) -> dict[str, torch.Tensor]:
    return {k: t for f in sorted(folder.glob("*.safetensors")) for k, t in load_file(f).items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["api", "job", "resume", "ddp", "inputs"], default="api")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--case", type=int, default=None, help="run only this case number")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    case_of = {"api": api_case, "job": job_case, "resume": resume_case, "ddp": ddp_case,
               "inputs": inputs_case}[args.mode]
    counts = {"ok": 0, "refused": 0, "failed": 0}
    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        sys.path[:] = [os.path.abspath(entry) if entry else entry for entry in sys.path]  # PYTHONPATH=src
        os.chdir(work)  # an option drawn as a relative path (an --out of 'cosine') lands here, not in the checkout
        from conftest import TEXT

        (work / "calib.txt").write_text(TEXT)
        (work / "eval.txt").write_text(TEXT[::-1].replace(" ", " the "))
        numbers = [args.case] if args.case is not None else range(10**9)
        for number in numbers:
            if args.case is None and time.time() - started > args.seconds:
                break
            print(f"#{number}", end=" ")
            try:
                case_of(random.Random(args.seed * 10**6 + number), work)
                counts["ok"] += 1
                print("-> ok", flush=True)
            except PrunelabError as error:
                counts["refused"] += 1
                print(f"-> refused: {error}", flush=True)
            except Exception:
                counts["failed"] += 1
                print("-> FAILED", flush=True)
                traceback.print_exc()
                sys.stdout.flush()
    print(f"{args.mode}, seed {args.seed}: {counts['ok']} ran, {counts['refused']} refused, {counts['failed']} failed "
          f"in {time.time() - started:.0f} s")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
