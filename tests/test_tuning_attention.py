"""The bf16 tuning attention: as close to the fp32 block as transformers' sdpa under autocast, sdpa otherwise."""

import pytest
import torch
import torch.nn.functional as F

from auto_round.model.block_inputs import block_output, capture_block_inputs
from auto_round.model.blocks import find_block_groups, iter_blocks
from auto_round.model.tuning_attention import grouped_attention, tuning_attention
from tiny_models import random_ids, tiny_model


def block_cases(arch: str, padded: bool):
    model = tiny_model(arch)
    ids = random_ids(2, 16)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0  # left padding: three fully masked query rows
    blocks = [b for _, b in iter_blocks(model, find_block_groups(model))]
    captured = capture_block_inputs(model, blocks, ids, mask)
    for block, call in zip(blocks, captured.calls):
        args, kwargs = call.select(torch.arange(2))
        yield model, block, (captured.hidden_states, *args), kwargs, mask.bool()


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3", "gpt2", "opt", "gpt_neox"])
@pytest.mark.parametrize("padded", [False, True])
def test_bf16_block_output_as_close_to_fp32_as_sdpa(arch, padded):
    for model, block, args, kwargs, keep in block_cases(arch, padded):
        with torch.no_grad():
            exact = block_output(block(*args, **kwargs))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                sdpa = block_output(block(*args, **kwargs)).float()
                with tuning_attention(model):
                    ours = block_output(block(*args, **kwargs)).float()
        assert torch.isfinite(ours).all()
        sdpa_err = (sdpa - exact)[keep].abs().max().item()
        ours_err = (ours - exact)[keep].abs().max().item()
        assert ours_err <= 2 * sdpa_err + 1e-3 * exact.abs().max().item(), (ours_err, sdpa_err)
        assert model.config._attn_implementation == "sdpa"


def test_without_autocast_it_is_sdpa_exactly():
    for model, block, args, kwargs, _ in block_cases("llama", True):
        with torch.no_grad():
            plain = block_output(block(*args, **kwargs))
            with tuning_attention(model):
                same = block_output(block(*args, **kwargs))
        assert torch.equal(plain, same)


def test_grouped_heads_match_repeated_kv_attention():
    """GQA without repeating k/v: head h must use kv head h // group, as transformers' repeat_kv does."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, n, 10, 8, dtype=torch.bfloat16) for n in (6, 2, 2))
    bool_mask = torch.ones(2, 1, 10, 10, dtype=torch.bool).tril()
    bool_mask[1, :, :, :2] = False
    module = torch.nn.Module()
    for mask in (None, bool_mask):
        out, _ = grouped_attention(module, q, k, v, mask, scaling=0.3)
        expect = F.scaled_dot_product_attention(
            q.double(), k.double().repeat_interleave(3, 1), v.double().repeat_interleave(3, 1),
            attn_mask=mask, is_causal=mask is None, scale=0.3).transpose(1, 2)
        rows = slice(None) if mask is None else slice(2, None)  # rows 0-1 of sample 1 see no key at all
        assert (out.double() - expect)[:, rows].abs().max().item() < 3e-2


def test_config_restored_after_an_error():
    model = tiny_model("llama")
    with pytest.raises(RuntimeError):
        with tuning_attention(model):
            assert model.config._attn_implementation != "sdpa"
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("opt_in", [False, True])
def test_used_only_when_asked_for(monkeypatch, opt_in):
    """Off by default (it costs accuracy at 2 bits); amp_attention=True routes the tuning attention through it."""
    import auto_round.model.tuning_attention as ta
    from auto_round import AutoRound

    calls = []
    real = ta.grouped_attention
    monkeypatch.setattr(ta, "grouped_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(ta, "NAME", f"auto_round_tuning_test_{opt_in}")  # register the wrapper afresh
    ar = AutoRound(tiny_model("llama"), dataset=random_ids(4, 16), nsamples=4, seqlen=16, batch_size=2, iters=2,
                   group_size=32, amp=True, amp_attention=opt_in)
    ar.quantize()
    assert bool(calls) == opt_in
    assert ar.model.config._attn_implementation == "sdpa"
