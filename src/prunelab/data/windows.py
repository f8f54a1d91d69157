"""Token windows: random calibration windows and non-overlapping evaluation windows (no BOS)."""

from __future__ import annotations

import torch

from ..errors import PrunelabError


PIECE_CHARS = 1 << 20


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of `text` without special tokens; with `max_tokens`, only a prefix is tokenised.

    Long texts are tokenised in pieces that start at a blank line (where no token can straddle),
    which bounds the tokenizer's transient memory to that of one piece.
    """
    if max_tokens is None:
        pieces, start = [], 0
        while start < len(text):
            cut = text.find("\n\n", start + PIECE_CHARS)
            cut = len(text) if cut < 0 else cut
            pieces.append(torch.tensor(tokenizer(text[start:cut], add_special_tokens=False)["input_ids"], dtype=torch.long))
            start = cut
        return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    chars = max_tokens * 6
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if chars >= len(text):
            return torch.tensor(ids, dtype=torch.long)
        if len(ids) > max_tokens:  # the last token may straddle the cut: drop it
            return torch.tensor(ids[:max_tokens], dtype=torch.long)
        chars *= 2


def calibration_windows(tokenizer, text: str, samples: int, seqlen: int, seed: int):
    """`samples` windows of `seqlen` tokens at uniformly random starts (recorded for the report)."""
    ids = tokenize(tokenizer, text)
    if len(ids) < seqlen + 1:
        raise PrunelabError(f"calibration text too short: {len(ids)} tokens, need more than seqlen={seqlen}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seqlen, (samples,), generator=generator)
    windows = torch.stack([ids[s:s + seqlen] for s in starts.tolist()])
    return windows, {"text_tokens": len(ids), "starts": starts.tolist()}


def evaluation_windows(tokenizer, text: str, seqlen: int, max_windows: int = 0) -> torch.Tensor:
    """The first `max_windows` (0 = all) non-overlapping `seqlen`-token windows of `text`."""
    ids = tokenize(tokenizer, text, max_tokens=seqlen * max_windows + 1 if max_windows else None)
    count = len(ids) // seqlen if not max_windows else min(max_windows, len(ids) // seqlen)
    if count == 0:
        raise PrunelabError(f"evaluation text too short: {len(ids)} tokens, need at least one window of {seqlen}")
    return ids[: count * seqlen].view(count, seqlen)
