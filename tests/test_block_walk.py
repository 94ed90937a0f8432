"""Block discovery and input capture: walking blocks one at a time must reproduce the full model."""

import pytest
import torch

from auto_round.model.block_inputs import block_output, capture_block_inputs
from auto_round.model.blocks import find_block_groups, iter_blocks
from tiny_models import CONFIGS, random_ids

import transformers as tf

EXPECTED_GROUPS = {"gpt2": "transformer.h", "opt": "model.decoder.layers", "gpt_neox": "gpt_neox.layers",
                   "falcon": "transformer.h", "gpt_bigcode": "transformer.h"}


def three_layer_model(arch):
    cfg = CONFIGS[arch]()
    for attr in ("num_hidden_layers", "n_layer"):
        if hasattr(cfg, attr):
            setattr(cfg, attr, 3)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = (list(cfg.layer_types) * 3)[:3]
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_block_walk_reproduces_hidden_states(arch):
    model = three_layer_model(arch)
    groups = find_block_groups(model)
    assert groups == [EXPECTED_GROUPS.get(arch, "model.layers")]
    blocks = [b for _, b in iter_blocks(model, groups)]
    ids = random_ids(5, 16)
    mask = torch.ones_like(ids)
    mask[4, 12:] = 0  # one padded sample: masks must be carried per sample
    captured = capture_block_inputs(model, blocks, ids, mask)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        h = captured.hidden_states
        assert torch.equal(h, reference[0])
        for i, (block, call) in enumerate(zip(blocks[:2], captured.calls)):
            args, kwargs = call.select(torch.arange(5))
            h = block_output(block(h, *args, **kwargs))
            assert torch.equal(h, reference[i + 1]), f"block {i} output differs"
        # a subset of samples gets the matching slice of per-sample arguments
        args, kwargs = captured.calls[0].select(torch.tensor([4, 1]))
        sub = block_output(blocks[0](captured.hidden_states[[4, 1]], *args, **kwargs))
        assert torch.allclose(sub, reference[1][[4, 1]], atol=1e-6)
    # the blocks' own forward is restored after capture
    assert "forward" not in blocks[0].__dict__


def test_capture_refuses_inconsistent_chunks():
    model = three_layer_model("llama")
    blocks = [b for _, b in iter_blocks(model, find_block_groups(model))]
    ids = random_ids(4, 16)
    mask = torch.ones_like(ids)
    mask[3, 10:] = 0  # chunk 1 needs a mask tensor, chunk 0 gets None under sdpa
    with pytest.raises(RuntimeError, match="one chunk"):
        capture_block_inputs(model, blocks, ids, mask, chunk_size=2)
