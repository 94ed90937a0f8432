"""num_hidden_layers (CLI --num_hidden_layers / --debug_layer_num, the reference's debug flag): a checkpoint
loaded with only its first N blocks, per-layer config lists cut with it, quantized and exported as such."""

from __future__ import annotations

import pytest
import torch

from auto_round import AutoRound
from auto_round.cli.main import main
from auto_round.model.loading import ModelLoadError
from tiny_models import random_ids, saved_tiny_model, tiny_model, tiny_tokenizer


def test_only_the_first_layers_are_loaded_quantized_and_exported(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = saved_tiny_model(tmp_path / "gemma3", "gemma3")  # 2 layers with their own layer_types
    full = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ar = AutoRound(str(folder), scheme="W4A16G32", iters=0, num_hidden_layers=1)
    assert len(ar.model.model.layers) == 1 and ar.model.config.layer_types == ["sliding_attention"]
    assert torch.equal(ar.model.model.layers[0].mlp.up_proj.weight, full.model.layers[0].mlp.up_proj.weight)
    ar.quantize_and_save(tmp_path / "out")
    code = main([str(folder), "--iters", "0", "--num_hidden_layers", "1", "--output_dir", str(tmp_path / "cli")])
    assert code in (0, None)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "cli")
    assert reloaded.config.num_hidden_layers == 1 and len(reloaded.model.layers) == 1


def test_out_of_range_or_a_module_is_refused(tmp_path):
    folder = saved_tiny_model(tmp_path / "llama")
    for bad in (0, 3):
        with pytest.raises(ModelLoadError, match=r"num_hidden_layers must be an integer in \[1, 2\]"):
            AutoRound(str(folder), iters=0, num_hidden_layers=bad)
    with pytest.raises(ValueError, match="pass a model path"):
        AutoRound(tiny_model("llama"), tiny_tokenizer(), iters=0, num_hidden_layers=1, dataset=random_ids(4, 16))
