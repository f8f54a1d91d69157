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
            pieces.append(
                torch.tensor(tokenizer(text[start:cut], add_special_tokens=False)["input_ids"], dtype=torch.long)
            )
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


def calibration_windows(tokenizer, text: str, samples: int, seqlen: int, seed: int, heldout: int = 0):
    """`samples` windows of `seqlen` tokens at uniformly random starts (recorded for the report).

    With `heldout`, that many further windows are drawn that overlap none of the first ones (for
    choosing hyper-parameters on calibration text the training never saw); they are returned as
    a third value (None without). The training windows are the same whether or not held-out ones are drawn.
    """
    ids = tokenize(tokenizer, text)
    if len(ids) < seqlen + 1:
        raise PrunelabError(f"calibration text too short: {len(ids)} tokens, need more than seqlen={seqlen}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seqlen, (samples,), generator=generator)
    windows = torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
    info = {"text_tokens": len(ids), "starts": starts.tolist()}
    if not heldout:
        return windows, info, None
    covered = torch.zeros(len(ids) + seqlen, dtype=torch.int32)  # windows covering each position
    for s in starts.tolist():
        covered[s : s + seqlen] += 1
    prefix = torch.cat([torch.zeros(1, dtype=torch.int64), covered.cumsum(0)])
    free = (
        [s for s in range(len(ids) - seqlen) if prefix[s + seqlen] == prefix[s]]
        if len(ids) < 4 * seqlen * (samples + heldout)
        else None
    )
    held: list[int] = []
    for _ in range(100 * heldout):
        if len(held) == heldout:
            break
        if free is not None:  # short text: draw among the free starts
            if not free:
                break
            s = free[int(torch.randint(0, len(free), (1,), generator=generator))]
        else:
            s = int(torch.randint(0, len(ids) - seqlen, (1,), generator=generator))
        if prefix[s + seqlen] == prefix[s]:
            held.append(s)
            covered[s : s + seqlen] += 1
            prefix = torch.cat([torch.zeros(1, dtype=torch.int64), covered.cumsum(0)])
            if free is not None:
                free = [f for f in free if prefix[f + seqlen] == prefix[f]]
    if len(held) < heldout:
        raise PrunelabError(
            f"calibration text too short: {len(ids)} tokens leave room for only {len(held)} of "
            f"{heldout} held-out windows of {seqlen} tokens beside the {samples} training windows"
        )
    info["heldout_starts"] = held
    return windows, info, torch.stack([ids[s : s + seqlen] for s in held])


def evaluation_windows(tokenizer, text: str, seqlen: int, max_windows: int = 0) -> torch.Tensor:
    """The first `max_windows` (0 = all) non-overlapping `seqlen`-token windows of `text`."""
    ids = tokenize(tokenizer, text, max_tokens=seqlen * max_windows + 1 if max_windows else None)
    count = len(ids) // seqlen if not max_windows else min(max_windows, len(ids) // seqlen)
    if count == 0:
        raise PrunelabError(f"evaluation text too short: {len(ids)} tokens, need at least one window of {seqlen}")
    return ids[: count * seqlen].view(count, seqlen)


def embedding_rows(model) -> int | None:
    """How many token ids the model has embeddings for (None where its embedding does not say)."""
    return getattr(model.get_input_embeddings(), "num_embeddings", None)


def check_tokenizer_fits(rows: int | None, tokenizer: str, windows: dict[str, torch.Tensor | None]) -> None:
    """Every token id a tokenizer gave the windows has one of the model's `rows` embeddings: a tokenizer that is
    not the model's fails here, in one line and before any work, not as an IndexError in the first forward."""
    for name, ids in windows.items():
        if rows is not None and ids is not None and ids.numel() and int(ids.max()) >= rows:
            raise PrunelabError(f"the {name} windows hold token id {int(ids.max())}, but the model's embeddings "
                                f"have {rows} rows: {tokenizer} is not this model's")


def check_token_ids(ids, vocab_size: int | None, name: str = "calibration", attention_mask=None) -> None:
    """Token ids given through the API: a [windows, seqlen] integer tensor of ids the model knows, with
    an optional attention mask of the same shape, 1 at real tokens and 0 at padding."""
    if not isinstance(ids, torch.Tensor):
        raise PrunelabError(
            f"{name} must be a tensor of token ids (or the name of a text source), got {type(ids).__name__}"
        )
    if ids.dim() != 2 or ids.numel() == 0:
        raise PrunelabError(f"{name} must be [windows, seqlen] token ids, got shape {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise PrunelabError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        raise PrunelabError(f"{name} holds token ids outside the model's vocabulary [0, {vocab_size}): {low}..{high}")
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(ids.shape):
        shape = (
            tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        )
        raise PrunelabError(f"attention_mask must have the shape of {name} {tuple(ids.shape)}, got {shape}")
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise PrunelabError("attention_mask must hold 1 at real tokens and 0 at padding, nothing else")
    empty = (attention_mask.sum(-1) == 0).nonzero().flatten().tolist()
    if empty:
        raise PrunelabError(
            f"attention_mask marks every token of window(s) {empty[:5]} as padding: "
            "no statistics or losses could come from them"
        )
