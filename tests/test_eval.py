"""Perplexity helper: checked against transformers' own `labels=` loss, and its input errors."""

import math

import pytest
import torch

from auto_round.eval.perplexity import EvalError, generate_text, perplexity, token_windows
from tiny_models import tiny_model, tiny_tokenizer

TEXT = ["The quick brown fox jumps over the lazy dog. " * 8, "Pack my box with five dozen liquor jugs. " * 8]


def test_windows_are_spread_evenly_and_do_not_overlap():
    tok = tiny_tokenizer()
    ids = tok("\n\n".join(TEXT), add_special_tokens=False).input_ids
    windows = token_windows(tok, TEXT, seqlen=32, nsamples=3)
    last = len(ids) - 32
    assert windows.shape == (3, 32)
    assert windows[0].tolist() == ids[:32]                      # head
    assert windows[1].tolist() == ids[last // 2:last // 2 + 32]  # middle
    assert windows[2].tolist() == ids[-32:]                     # tail
    assert token_windows(tok, TEXT, seqlen=32, nsamples=1)[0].tolist() == ids[:32]


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_perplexity_equals_exp_of_the_models_own_mean_loss(batch_size):
    torch.manual_seed(0)
    tok, model = tiny_tokenizer(), tiny_model("llama").eval()
    ppl = perplexity(model, tok, TEXT, seqlen=32, nsamples=3, batch_size=batch_size)
    windows = token_windows(tok, TEXT, seqlen=32, nsamples=3)
    with torch.no_grad():  # every window has the same number of predictions, so the mean of means is exact
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    assert ppl == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)


def test_too_little_text_is_a_clear_error():
    tok, model = tiny_tokenizer(), tiny_model("llama").eval()
    with pytest.raises(EvalError, match="fewer than nsamples"):
        perplexity(model, tok, ["short"], seqlen=64, nsamples=2)


def test_generate_is_the_greedy_continuation_without_the_prompt():
    tok, model = tiny_tokenizer(), tiny_model("llama").eval()
    model.generation_config.eos_token_id = None  # random weights: never stop early, always 5 new tokens
    ids = tok("abc", return_tensors="pt").input_ids
    with torch.no_grad():
        for _ in range(5):  # hand-rolled greedy decoding as the independent reference
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    expected = tok.decode(ids[0, 3:], skip_special_tokens=True)
    assert generate_text(model, tok, "abc", max_new_tokens=5) == expected
