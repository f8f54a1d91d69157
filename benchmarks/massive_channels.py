"""How much of the residual stream's energy a few channels hold, block by block (why `--loss cmse` exists).

    python benchmarks/massive_channels.py                                   # the embedded SmolLM2
    python benchmarks/massive_channels.py --model /tmp/gemma/gemma3-270m    # any model prunelab loads

For each block's output on 4 calibration windows of 512 tokens (the default text's): the stream's RMS, the
share of Σ_c E[h_c²] that the `--top` largest channels hold (what plain MSE on the stream weighs), the same
without each window's first token, and the next pre-norm's gain on those channels against its median (how
much the next block reads them).
"""

from __future__ import annotations

import argparse

import torch

from prunelab.data.sources import load_text
from prunelab.data.windows import calibration_windows
from prunelab.models.adapters import find_adapter
from prunelab.models.loading import load_model


@torch.no_grad()
def channel_gain(norm: torch.nn.Module) -> torch.Tensor:
    """|the norm's gain| per channel, read from what it returns for ±1 (mean 0, RMS 1): w for RMSNorm and
    LayerNorm, 1 + w for Gemma's, without knowing which."""
    sign = torch.ones(norm.weight.shape[-1], dtype=norm.weight.dtype)
    sign[1::2] = -1
    bias = getattr(norm, "bias", None)
    out = norm(sign[None])[0] - (bias if isinstance(bias, torch.Tensor) else 0)
    return (out * sign).float().abs()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--text", default="enwiki")
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args()
    loaded = load_model(args.model)
    model, tokenizer = loaded[0], loaded[1]
    ids, _, _ = calibration_windows(tokenizer, load_text(args.text), samples=4, seqlen=512, seed=0)
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[1:-1]  # every block's output but the last
    adapter = find_adapter(model)
    print(f"{args.model}: top {args.top} channels' share of the stream's mean square, block by block")
    print("block  rms      share  (not 1st)  channels                  next pre-norm's gain there / median")
    for i, h in enumerate(hidden):
        square = h.float().pow(2).mean((0, 1))
        top = square.topk(args.top)
        share = float(top.values.sum() / square.sum())
        later = h[:, 1:].float().pow(2).mean((0, 1))  # a window's first token is an attention sink in many models
        later_share = float(later.topk(args.top).values.sum() / later.sum())
        attention = adapter.halves(adapter.blocks[i + 1])[0]
        norm = next((n for n in attention.norms if n is not attention.output_norm), None)  # None: OLMo 2
        gain = channel_gain(norm) if norm is not None else torch.ones_like(square)
        relative = (gain[top.indices] / gain.median()).tolist()
        print(f"{i:5d}  {h.float().pow(2).mean().sqrt():7.1f}  {share:5.1%}  {later_share:8.1%}  "
              f"{str(top.indices.tolist()):24s}  "
              f"{' '.join(f'{r:.2f}' for r in relative)}")


if __name__ == "__main__":
    main()
