"""A model larger than memory: Wanda 50 % of a Llama-3.1-8B-shaped model (random weights from its config,
bfloat16 safetensors shards, 16 GB) on a machine whose RAM could not hold it in float32, with nothing but
the plain command. Prints the run's peak RSS (the whole process, sampled), its time by stage, and
then, where the memory allows (16 GB), reloads the output with `from_pretrained` in bfloat16 and
measures every layer's sparsity again.

    PYTHONPATH=src python benchmarks/stream_8b.py [--shape llama-3.1-8b] [--layers N] [--folder DIR]
        [--samples 128] [--eval-windows 40] [options]

Other options go to `prunelab run` (`--calib FILE --eval FILE` where the embedded text is not cached,
`--reconstruct attn-mlp` for reconstruction). `--shape qwen3-30b-a3b` builds a Mixture-of-Experts model
instead (128 routed experts a block, stored one matrix per expert and projection as on the hub; with
`--layers 8`, 11 GB of bfloat16, 22 GB in float32); `--shape gpt2-xl` a GPT-2 XL (1.56 B parameters, Conv1D
layers stored [in, out]; 3.1 GB of bfloat16).

The model is built once, one block at a time (never whole in memory), into `--folder` (default
~/.cache/prunelab/bench/<shape>-random, with `-<N>l` for fewer layers; the output needs as much again
beside it). Its tokenizer is the embedded SmolLM2's (49,152 ids, all valid rows of the larger
embeddings). On 2 CPU cores an 8B block takes minutes at the default 128 calibration windows: `--samples
8 --eval-windows 4` measures the memory in about an hour.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen3MoeConfig

from prunelab.assets import cache_dir
from prunelab.evaluate.sparsity import zeros_in
from prunelab.models.adapters import find_adapter
from prunelab.models.conv1d import hold, release
from prunelab.models.layout import to_stored
from prunelab.models.loading import embedded_model_dir

LLAMA_31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                   rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                   rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                   bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
QWEN3_30B_A3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                     num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=40960,
                     rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
                     bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16")
GPT2_XL = dict(vocab_size=50257, n_positions=1024, n_embd=1600, n_layer=48, n_head=25, bos_token_id=50256,
               eos_token_id=50256, torch_dtype="bfloat16")  # Conv1D layers, weights stored [in, out]
SHAPES = {"llama-3.1-8b": (LlamaConfig, LLAMA_31_8B), "qwen3-30b-a3b": (Qwen3MoeConfig, QWEN3_30B_A3B),
          "gpt2-xl": (GPT2Config, GPT2_XL)}


def build(folder: Path, shape: str = "llama-3.1-8b", layers: int | None = None) -> None:
    """config.json, tokenizer and one bfloat16 shard per block (N(0, 0.02) weights, unit norms), each block in
    the checkpoint's own layout (transformers' reverse conversion: routed experts one matrix apiece)."""
    if (folder / "model.safetensors.index.json").is_file():
        return
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config_class, values = SHAPES[shape]
    config = config_class(**{**values, **({"num_hidden_layers": layers} if layers else {})})
    config.save_pretrained(tmp)
    shutil.copy(embedded_model_dir() / "tokenizer.json", tmp)
    shutil.copy(embedded_model_dir() / "tokenizer_config.json", tmp)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    hold(skeleton)  # GPT-2's Conv1D layers as linears, for the adapter to find the blocks ...
    prefix_of_blocks = find_adapter(skeleton).blocks_prefix + "."
    release(skeleton)  # ... and back: the tensors are written as the model's class stores them
    generator = torch.Generator().manual_seed(0)

    def random(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Norm weights (1-D) are ones, biases zeros, the rest N(0, 0.02); in the checkpoint's layout."""
        held = {name: (torch.ones if name.endswith("weight") else torch.zeros)(t.shape, dtype=torch.bfloat16)
                if t.dim() == 1 else
                (torch.randn(*t.shape, generator=generator) * 0.02).to(torch.bfloat16) for name, t in tensors.items()}
        return {k: v.contiguous().clone() for k, v in to_stored(skeleton, held).items()}

    blocks, weight_map = config.num_hidden_layers, {}
    skeleton.tie_weights()  # a tied head is stored once, under the embedding's name, as save_pretrained stores it
    kept = {n for n, _ in skeleton.named_parameters()} | {n for n, _ in skeleton.named_buffers()}
    stored = {n: t for n, t in skeleton.state_dict().items() if n in kept}
    for i in range(blocks + 1):
        prefix = f"{prefix_of_blocks}{i}." if i < blocks else None
        tensors = random({n: t for n, t in stored.items()
                          if (n.startswith(prefix) if prefix else not n.startswith(prefix_of_blocks))})
        name = f"model-{i + 1:05d}-of-{blocks + 1:05d}.safetensors"
        save_file(tensors, tmp / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
        print(f"built shard {i + 1}/{blocks + 1}", file=sys.stderr, flush=True)
    size = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": size},
                                                                  "weight_map": weight_map}, indent=1))
    tmp.rename(folder)


def run(folder: Path, out: Path, extra: list[str]) -> tuple[dict, float, float, float]:
    """The plain command in a child process; its report, wall seconds, peak RSS (GB) sampled every 50 ms
    from here, and the second at which it was reached.

    Sampled, because the kernel's figures do not serve: prunelab resets the high-water mark (VmHWM) at
    each stage, and getrusage reads that same mark, or the one a thread saw when it exited."""
    argv = [sys.executable, "-m", "prunelab", "run", "--model", str(folder), "--method", "wanda", "--sparsity", "0.5",
            "--reconstruct", "none", "--out", str(out), "--overwrite", "--json", *extra]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        child = subprocess.Popen(argv, stdout=stdout, stderr=stderr, text=True)
        watched, peak, peak_at = psutil.Process(child.pid), 0, 0.0
        while child.poll() is None:
            try:
                rss = watched.memory_info().rss
            except psutil.Error:
                break
            if rss > peak:
                peak, peak_at = rss, time.perf_counter() - start
            time.sleep(0.05)
        child.wait()
        seconds = time.perf_counter() - start
        stdout.seek(0), stderr.seek(0)
        if child.returncode != 0:
            raise SystemExit(f"the run failed:\n{stderr.read()[-3000:]}")
        text = stdout.read()
    return json.loads(text[text.index("{"):]), seconds, peak / 1e9, peak_at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--shape", choices=list(SHAPES), default="llama-3.1-8b")
    parser.add_argument("--layers", type=int, default=None, help="decoder blocks (default: the shape's)")
    parser.add_argument("--folder", type=Path, default=None, help="the built model (default: in the cache)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: beside --folder)")
    parser.add_argument("--samples", type=int, default=None, help="calibration windows (default: prunelab's)")
    parser.add_argument("--eval-windows", type=int, default=None, help="evaluation windows (default: prunelab's)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--remove", action="store_true", help="remove the output folder at the end")
    args, passed = parser.parse_known_args()
    default = f"{args.shape}-random" + (f"-{args.layers}l" if args.layers else "")
    args.folder = args.folder or cache_dir() / "bench" / default
    build(args.folder, args.shape, args.layers)
    out = args.out or args.folder.with_name(args.folder.name + "-wanda50")
    extra = [*(["--samples", str(args.samples)] if args.samples else []),
             *(["--eval-windows", str(args.eval_windows)] if args.eval_windows else []),
             *(["--threads", str(args.threads)] if args.threads else []), *passed]
    report, seconds, peak, peak_at = run(args.folder, out, extra)
    try:
        summarise(report, seconds, peak, peak_at, args.folder, out)
    finally:
        if args.remove:
            shutil.rmtree(out, ignore_errors=True)


def summarise(report: dict, seconds: float, peak: float, peak_at: float, folder: Path, out: Path) -> None:
    streamed = report["model"].get("streamed")
    print(f"input: {sum(p.stat().st_size for p in folder.glob('*.safetensors')) / 1e9:.2f} GB of bfloat16 "
          f"shards; streamed: {streamed}")
    print(f"run: {seconds:.0f} s, peak RSS {peak:.2f} GB (sampled; at {peak_at:.0f} s); stages (seconds, peak RSS GB): "
          + ", ".join(f"{k} {v['seconds']:.0f} s {v['peak_rss_gb']:.2f}" for k, v in report["stages"].items()))
    metrics = report["metrics"]
    print(f"perplexity dense {metrics.get('dense', {}).get('perplexity', math.nan):.1f}, "
          f"pruned {metrics.get('pruned', {}).get('perplexity', math.nan):.1f} (random weights: a smoke figure)")
    submodels = (report.get("reconstruction") or {}).get("submodels", [])
    if submodels:
        down = sum(s["loss_heldout_after"] < s["loss_heldout_before"] for s in submodels)
        print(f"reconstruction: held-out loss down on {down} of {len(submodels)} submodels; "
              + ", ".join(f"{s['submodel']} {s['loss_heldout_before']:.3g} → {s['loss_heldout_after']:.3g}"
                          for s in submodels[:4]) + (" ..." if len(submodels) > 4 else ""))
    layers = [v["sparsity"] for v in report["sparsity"]["layers"].values()]
    print(f"sparsity read back from the shards: {report['sparsity']['sparsity']:.6f} overall, per layer min "
          f"{min(layers):.6f}, max {max(layers):.6f} ({len(layers)} layers)")
    del report
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    if psutil.virtual_memory().available < size + 2e9:
        print(f"not reloaded with from_pretrained: {size / 1e9:.1f} GB of weights, "
              f"{psutil.virtual_memory().available / 1e9:.1f} GB of memory available")
        return
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    hold(model)  # GPT-2's Conv1D layers as the linears the adapter finds (sparsity is the same either way)
    # the adapter's prunable matrices: linears, and fused expert tensors, which are not nn.Linear modules
    per_layer = [zeros_in(w) / w.numel() for w in find_adapter(model).prunable_weights().values()]
    print(f"reloaded with from_pretrained: {len(per_layer)} prunable matrices, sparsity min {min(per_layer):.6f}, "
          f"max {max(per_layer):.6f}")
    del model


if __name__ == "__main__":
    main()
