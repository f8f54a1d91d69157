import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# pytest-xdist workers (`-n 2` in .ci/run) share the cores: each takes its part rather than all of them
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

from tiny import VOCAB, tiny_model  # noqa: E402

TEXT = (
    "The river flows past the old mill and the children watch the boats go by. "
    "In the evening the lights of the town shine on the water, and the bridge is quiet. "
    "Every spring the farmers bring their goods to the market by the square. "
) * 40


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture()
def tiny_dir(tmp_path, tokenizer):
    """A tiny Llama-family model with a tokenizer, saved as a normal HF folder."""
    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def texts(tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    evaluation = tmp_path / "eval.txt"
    evaluation.write_text(TEXT[::-1].replace(" ", " the "))
    return calib, evaluation
