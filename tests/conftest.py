"""Shared pytest fixtures (no network, no hub)."""

from __future__ import annotations

import pytest

_TINY_CORPUS = """the quick brown fox jumps over the lazy dog .
a tiny tokenizer for calibration tests , built offline with the tokenizers library .
alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau
one two three four five six seven eight nine ten eleven twelve
"""


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A word-level `PreTrainedTokenizerFast` trained on a few lines: one token per word or punctuation run.

    Special tokens: <unk> 0, <pad> 1, </s> 2 (eos). Adds no special tokens when encoding, so a text of
    k whitespace-separated words (no punctuation) is exactly k tokens.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "</s>"], min_frequency=1)
    tok.train_from_iterator(_TINY_CORPUS.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


@pytest.fixture(scope="module")
def one_thread():
    """Many small tensor ops (ggml searches): one intra-op thread is fastest and immune to a busy shared CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
