"""lm-eval's HFLM around a model larger than memory (`streaming.StreamedModel`).

HFLM would run one forward per batch of requests, which for a streamed model means reading every block
from disk once per batch. This subclass keeps everything of HFLM that decides the numbers (tokenisation,
BOS handling, truncation to the model's length: `loglikelihood` → `_encode_pair` → `tok_encode`) and
replaces only `_loglikelihood_tokens`: the requests are taken in groups of about `tokens_per_pass`
tokens, and each group goes through the model one decoder block at a time
(`streaming.streamed_loglikelihoods`), so the weights are read once per group.
"""

from __future__ import annotations

from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

from ..errors import PrunelabError
from ..streaming import StreamedModel, streamed_loglikelihoods


class StreamedLM(HFLM):
    def __init__(self, streamed: StreamedModel, tokenizer, batch_size: int, tokens_per_pass: int):
        # the skeleton's weights are on the meta device: HFLM reads only its config and device from it
        super().__init__(pretrained=streamed.model, tokenizer=tokenizer, batch_size=batch_size)
        self.streamed, self.tokens_per_pass = streamed, tokens_per_pass

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        # as HFLM: the input is context + continuation without its last token, cut to the model's length
        # from the left; its last len(continuation) positions predict the continuation
        inputs = [(context + continuation)[-(self.max_length + 1):][:-1] for _, context, continuation in requests]
        targets = [continuation for _, _, continuation in requests]
        order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))  # similar lengths share a padded batch
        scores: list = [None] * len(requests)
        groups = _groups(order, inputs, self.tokens_per_pass)
        for group in tqdm(groups, desc="log-likelihood passes over the model", disable=disable_tqdm or len(groups) < 2):
            found = streamed_loglikelihoods(self.streamed, [inputs[i] for i in group], [targets[i] for i in group],
                                            self.batch_size, progress=not disable_tqdm)
            for i, score in zip(group, found):
                scores[i] = score
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise PrunelabError("a streamed model scores multiple-choice tasks only (no rolling log-likelihood tasks)")

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise PrunelabError("a streamed model scores multiple-choice tasks only (no generation tasks)")


def _groups(order: list[int], inputs: list[list[int]], tokens_per_pass: int) -> list[list[int]]:
    """`order` cut into runs of at most `tokens_per_pass` tokens (at least one request each)."""
    groups, current, tokens = [], [], 0
    for i in order:
        if current and tokens + len(inputs[i]) > tokens_per_pass:
            groups.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += len(inputs[i])
    return groups + [current] if current else groups
