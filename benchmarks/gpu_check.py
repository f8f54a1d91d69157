"""GPU check: models built from configs (random weights), no downloads.

1. Agreement: a tiny Llama pruned (Wanda, SparseGPT; 50 % and 2:4; RIA, OWL, 2:4 with channel permutation)
   and reconstructed (attn-mlp, fixed lr; float32 matmuls, and for Wanda also bfloat16) on the CPU and on
   the GPU from the same weights and windows: share of equal mask entries, relative perplexity difference
   on held-out random windows. Then tiny Qwen3-MoE and GPT-OSS (fused experts, GPT-OSS's transposed and
   interleaved), Wanda 2:4 with permutation, alone and with attn-mlp. And FLAP of tiny Llama, GPT-2, GPT-NeoX,
   Phi-3 and Falcon (q, k and v fused in each order it knows): the same linears narrowed alike, perplexities.
2. Time and memory at real shapes: a Llama-2-7B-shaped stack (hidden 4096, MLP 11008, 32 heads) of a few
   blocks, Wanda and SparseGPT 50 % and attn-mlp reconstruction (float32 and bfloat16 matmuls), each
   stage's seconds and CUDA peak.
3. Retraining (full, MaskLoRA) of a tiny pruned Llama on the CPU and on the GPU from the same weights and
   windows in float32: held-out loss after, masks kept; then on the GPU with bfloat16 autocast (`auto`).
4. The whole job on the GPU (`prunelab.run(..., device="cuda")`) of a tiny saved model: the report's
   stages carry `cuda_peak_gb`.
5. Sequential onloading (a streamed model, one block on the GPU at a time): the same weights as the
   whole-model run, streamed FLAP and layer removal against the whole model, the zero-shot scorer's
   log-likelihoods (`streamed_loglikelihoods`, what `--tasks` uses on a streamed model; lm-eval itself
   is not in the device image) against a forward of the whole model, and a CUDA peak that does not grow
   with the number of blocks.
6. Quantized checkpoints: a tiny MXFP4 GPT-OSS loaded onto the GPU, dequantized whatever kernels are installed.

    PYTHONPATH=src python benchmarks/gpu_check.py [--blocks 4] [--windows 64] [--seqlen 2048]

Prints one line per measurement; the results go into docs/RESULTS.md (GPU section).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import prunelab  # noqa: E402
from prunelab.evaluate.sparsity import zeros_in  # noqa: E402
from prunelab.measure import stage  # noqa: E402
from prunelab.models.adapters import find_adapter  # noqa: E402


def llama(hidden: int, inter: int, heads: int, kv: int, layers: int, vocab: int, seed: int = 0):
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                      num_attention_heads=heads, num_key_value_heads=kv, num_hidden_layers=layers,
                                      max_position_embeddings=4096)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.use_cache = False
    return model.eval()


def ppl(model, ids: torch.Tensor) -> float:
    return prunelab.perplexity(model, ids, progress=False)["perplexity"]


def agreement(device: str) -> None:
    base = llama(256, 512, 8, 4, 2, 512)
    ids = torch.randint(0, 512, (24, 128), generator=torch.Generator().manual_seed(1))
    test = torch.randint(0, 512, (8, 128), generator=torch.Generator().manual_seed(2))
    targets = ({"sparsity": 0.5}, {"pattern": "2:4"})
    cases = [(m, t) for t in targets for m in ("wanda", "sparsegpt")]
    cases += [("ria", {"sparsity": 0.5}), ("wanda", {"sparsity": 0.5, "layerwise": "owl"})]
    # the device image has no scipy unless gpu_wheels.sh's wheels came along
    permute = importlib.util.find_spec("scipy") is not None
    if permute:
        cases.append(("wanda", {"pattern": "2:4", "permute": True}))
    else:
        print("agreement wanda 2:4 permute: skipped, no scipy (run benchmarks/gpu_wheels.sh, carry .whl)", flush=True)
    for method, target in cases:
        # float32 for the exact comparison; bfloat16 matmuls (the default on both devices here) once
        recons = [("none", None), ("attn-mlp", "float32")] + [("attn-mlp", "bfloat16")] * (method == "wanda")
        for recon, precision in recons:
            agree(base, method, target, recon, precision, ids, test, device, "")
    # experts: fused views (GPT-OSS's transposed, interleaved, with biases), trained and reordered through them
    from tiny import tiny_model
    for family in ("qwen3_moe", "gpt_oss"):
        moe = tiny_model(family)
        moe_ids, moe_test = ids % moe.config.vocab_size, test % moe.config.vocab_size
        target = {"pattern": "2:4", "permute": True} if permute else {"pattern": "2:4"}
        for recon, precision in (("none", None), ("attn-mlp", "float32")):
            agree(moe, "wanda", target, recon, precision, moe_ids, moe_test, device, f"{family} ")
    for family in ("llama", "gpt2", "gpt_neox", "phi3", "falcon"):  # FLAP, fused q/k/v orders among them
        model = tiny_model(family, layers=4)
        vocab = model.config.vocab_size
        flap_agrees(model, ids % vocab, test % vocab, device, family)


def agree(base, method: str, target: dict, recon: str, precision: str | None, ids, test, device: str,
          label: str) -> None:
    """Prune (and reconstruct) copies of `base` on the CPU and on `device`; print how far they agree."""
    models = {}
    for where in ("cpu", device):
        model = copy.deepcopy(base).to(where)
        options = dict(method=method, forward_batch=8, progress=False, **target)
        options["reconstruct"] = "none" if recon == "none" else {"lr": 1e-3, "heldout": 4, "precision": precision}
        prunelab.prune(model, calibration=ids, **options)
        models[where] = model
    cpu, gpu = (find_adapter(models[d]).prunable_weights() for d in ("cpu", device))
    equal = sum(int(((cpu[k] == 0) == (gpu[k].cpu() == 0)).sum()) for k in cpu)
    same = equal / sum(v.numel() for v in cpu.values())
    p_cpu, p_gpu = ppl(models["cpu"], test), ppl(models[device], test.to(device))
    print(f"agreement {label}{method} {target} reconstruct={recon} {precision or ''}: masks equal {same:.4%}, "
          f"ppl cpu {p_cpu:.3f} gpu {p_gpu:.3f} ({(p_gpu / p_cpu - 1):+.3%})", flush=True)


def flap_agrees(base, ids, test, device: str, label: str) -> None:
    """FLAP on copies of `base` on the CPU and on `device`: whether the same rows and columns are kept (its scores
    are float64 statistics of float32 activations) and the narrowed models' perplexities."""
    models, kept = {}, {}
    for where in ("cpu", device):
        model = copy.deepcopy(base).to(where)
        report = prunelab.prune(model, calibration=ids, method="flap", width={"ratio": 0.25}, reconstruct="none",
                                forward_batch=8, progress=False)
        models[where], kept[where] = model, report["structure"]["linears"]
    same = sum(kept["cpu"][k] == kept[device].get(k) for k in kept["cpu"]) / max(len(kept["cpu"]), 1)
    p_cpu, p_gpu = ppl(models["cpu"], test), ppl(models[device], test.to(device))
    print(f"agreement {label} flap 0.25: linears narrowed alike {same:.0%} of {len(kept['cpu'])}, "
          f"ppl cpu {p_cpu:.3f} gpu {p_gpu:.3f} ({(p_gpu / p_cpu - 1):+.3%})", flush=True)


def shapes(blocks: int, windows: int, seqlen: int, device: str) -> None:
    ids = torch.randint(0, 32000, (windows, seqlen), generator=torch.Generator().manual_seed(0))
    runs = (("wanda", "none"), ("sparsegpt", "none"), ("wanda", "float32"), ("wanda", "bfloat16"))
    for method, recon in runs:  # recon: none, or attn-mlp reconstruction with matmuls in that precision
        model = llama(4096, 11008, 32, 32, blocks, 32000).to(device)
        stages: dict = {}
        options = ({"reconstruct": "none"} if recon == "none" else
                   {"reconstruct": {"lr": 1e-3, "heldout": 8, "precision": recon}})
        with stage("prune", stages):
            prunelab.prune(model, calibration=ids, method=method, sparsity=0.5, forward_batch=8, progress=False,
                           **options)
            if device == "cuda":
                torch.cuda.synchronize()
        entry = stages["prune"]
        per_block = entry["seconds"] / blocks
        label = "none" if recon == "none" else f"attn-mlp ({recon} matmuls)"
        print(f"7B-shaped, {blocks} blocks, {windows} x {seqlen} tokens, {method} 50 % + {label}: "
              f"{entry['seconds']:.1f} s ({per_block:.2f} s/block, {32 * per_block:.0f} s for 32 blocks), "
              f"CUDA peak {entry.get('cuda_peak_gb', math.nan):.2f} GB", flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()


def retraining(device: str) -> None:
    from prunelab.config import RunConfig
    from prunelab.recover import retrain

    base = llama(256, 512, 8, 4, 2, 512)
    ids = torch.randint(0, 512, (32, 128), generator=torch.Generator().manual_seed(1))
    held = torch.randint(0, 512, (8, 128), generator=torch.Generator().manual_seed(2))
    prunelab.prune(base, calibration=ids, method="wanda", sparsity=0.5, reconstruct="none", progress=False)
    for method, precision in (("full", "float32"), ("masklora", "float32"), ("full", "auto"), ("masklora", "auto")):
        losses = {}
        for where in ("cpu", device) if precision == "float32" else (device,):
            model = copy.deepcopy(base).to(where)
            cfg = RunConfig(seqlen=128, reconstruct="none", retrain={
                "method": method, "tokens": ids.numel(), "lr": 1e-4 if method == "full" else 1e-3, "evals": 1,
                "precision": precision, "heldout": 8})
            zeros = sum(zeros_in(w) for w in find_adapter(model).prunable_weights().values())
            model, record = retrain(model, find_adapter(model).prunable_weights(), cfg, ids, held, progress=False)
            after = sum(zeros_in(w) for w in find_adapter(model).prunable_weights().values())
            losses[where] = (record["heldout_loss_before"], record["heldout_loss_after"], record["precision"],
                             after == zeros)
        print(f"retraining {method} {precision}: " + "; ".join(
            f"{where} held-out {b:.4f} -> {a:.4f} ({p}, mask kept {kept})" for where, (b, a, p, kept) in
            losses.items()), flush=True)


def quantized(device: str) -> None:
    """A tiny MXFP4 GPT-OSS loaded onto `device`: on a GPU with triton and the `kernels` package transformers would
    keep the codes unless asked to dequantize, which `load_model` always does."""
    from conftest import make_tokenizer
    from safetensors.torch import load_file
    from tiny import mxfp4_checkpoint
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from prunelab.models.loading import load_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = mxfp4_checkpoint(Path(tmp) / "mxfp4", make_tokenizer())
        stored = load_file(folder / "model.safetensors")
        name = "model.layers.0.mlp.experts.gate_up_proj"
        expected = convert_moe_packed_tensors(stored[f"{name}_blocks"], stored[f"{name}_scales"], dtype=torch.float32)
        model = load_model(str(folder), device=device)[0]
        got, experts = model.get_parameter(name), type(model.get_submodule(name.rpartition(".")[0])).__name__
        print(f"quantized on {device}: MXFP4 experts load as {got.dtype} ({experts}), equal to transformers' "
              f"dequantization: {torch.equal(got.cpu(), expected)}", flush=True)


def whole_job(device: str) -> None:
    from conftest import TEXT, make_tokenizer
    from tiny import tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tiny"
        tiny_model("llama").save_pretrained(folder)
        make_tokenizer().save_pretrained(folder)
        (Path(tmp) / "calib.txt").write_text(TEXT)
        (Path(tmp) / "eval.txt").write_text(TEXT[::-1])
        report = prunelab.run(model=str(folder), calib=str(Path(tmp) / "calib.txt"), eval=str(Path(tmp) / "eval.txt"),
                              samples=16, seqlen=64, eval_seqlen=64, eval_windows=4, device=device,
                              out=str(Path(tmp) / "out"), progress=False)
        print(f"whole job on {device}: stages " + json.dumps({k: {"s": v["seconds"], "cuda_gb": v.get("cuda_peak_gb")}
                                                         for k, v in report["stages"].items()}), flush=True)
        print(f"whole job on {device}: perplexity {report['metrics']['dense']['perplexity']:.2f} -> "
              f"{report['metrics']['pruned']['perplexity']:.2f}, sparsity {report['sparsity']['sparsity']:.4f}",
              flush=True)


def onloading(device: str) -> None:
    """Sequential onloading: a saved model streamed to the device one block at a time (forced by a tiny
    --max-memory): weights equal to the run on the whole model on the same device, and a CUDA peak
    that does not grow with the number of blocks (4 vs 8 blocks of a 1024-wide Llama)."""
    from conftest import TEXT, make_tokenizer
    from safetensors.torch import load_file
    from tiny import tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "calib.txt").write_text(TEXT)
        (tmp / "eval.txt").write_text(TEXT[::-1])
        common = dict(calib=str(tmp / "calib.txt"), eval=str(tmp / "eval.txt"), samples=16, seqlen=64, eval_seqlen=64,
                      eval_windows=4, device=device, progress=False, eval_dense=False)
        folder = tmp / "tiny"
        tiny_model("llama", layers=4).save_pretrained(folder)
        make_tokenizer().save_pretrained(folder)
        whole = prunelab.run(model=str(folder), out=str(tmp / "whole"), **common)
        streamed = prunelab.run(model=str(folder), out=str(tmp / "streamed"), max_memory=3e-4, **common)
        a, b = load_file(tmp / "whole" / "model.safetensors"), {}
        for file in (tmp / "streamed").glob("*.safetensors"):
            b.update(load_file(file))
        equal = sum(bool(a[k].equal(b[k])) for k in a)
        print(f"onloading on {device}: {equal}/{len(a)} tensors equal to the whole-model run; perplexity "
              f"{whole['metrics']['pruned']['perplexity']:.4f} vs {streamed['metrics']['pruned']['perplexity']:.4f}",
              flush=True)
        loglikelihoods(folder, device)
        structured = {"flap": dict(method="flap", width={"ratio": 0.25}, speed=False),
                      "layers-bi": dict(method="layers", depth={"remove": 1}, speed=False)}
        for name, options in structured.items():  # streamed structured pruning against the whole model
            whole = prunelab.run(model=str(folder), out=str(tmp / f"{name}-whole"), reconstruct="none",
                                 **options, **common)
            streamed = prunelab.run(model=str(folder), out=str(tmp / f"{name}-streamed"), reconstruct="none",
                                    max_memory=3e-4, **options, **common)
            print(f"onloading on {device}, {name}: perplexity {whole['metrics']['pruned']['perplexity']:.4f} whole vs "
                  f"{streamed['metrics']['pruned']['perplexity']:.4f} streamed; parameters after "
                  f"{whole['structure']['parameters_after']} vs {streamed['structure']['parameters_after']}",
                  flush=True)
        for layers in (4, 8):
            folder = tmp / f"wide-{layers}"
            llama(1024, 2816, 16, 8, layers, 512).save_pretrained(folder)
            make_tokenizer().save_pretrained(folder)
            report = prunelab.run(model=str(folder), out=str(tmp / f"wide-{layers}-out"), max_memory=0.1, **common)
            peaks = {k: v.get("cuda_peak_gb") for k, v in report["stages"].items()}
            print(f"onloading on {device}, {layers} blocks of width 1024: CUDA peak by stage {json.dumps(peaks)}",
                  flush=True)


def loglikelihoods(folder: Path, device: str) -> None:
    """Requests of different lengths in one right-padded batch, streamed block by block onto `device`, against
    a forward of the whole model on the same device: largest difference of log p(last two tokens)."""
    from prunelab.streaming import StreamedModel, streamed_loglikelihoods

    model = transformers.AutoModelForCausalLM.from_pretrained(folder).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randint(0, 256, (n,), generator=generator).tolist() for n in (5, 17, 40, 9)]
    targets = [torch.randint(0, 256, (2,), generator=generator).tolist() for _ in inputs]
    got = streamed_loglikelihoods(StreamedModel(folder, torch.float32, torch.device(device)), inputs, targets,
                                  batch_size=4, progress=False)
    worst = 0.0
    for ids, target, (logp, _) in zip(inputs, targets, got):
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids], device=device)).logits[0, -2:], -1)
        worst = max(worst, abs(logp - log_probs.gather(-1, torch.tensor(target, device=device)[:, None]).sum().item()))
    print(f"onloading on {device}: streamed log-likelihoods of 4 padded requests, largest difference from the "
          f"whole model {worst:.2e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["agreement", "retraining", "shapes", "job", "onloading", "quantized"])
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script itself")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {name}", flush=True)
    started = time.perf_counter()
    if "quantized" not in args.skip:
        quantized(args.device)
    if "job" not in args.skip:
        whole_job(args.device)
    if "onloading" not in args.skip:
        onloading(args.device)
    if "agreement" not in args.skip:
        agreement(args.device)
    if "retraining" not in args.skip:
        retraining(args.device)
    if "shapes" not in args.skip:
        shapes(args.blocks, args.windows, args.seqlen, args.device)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
