"""quant_lm_head with a static activation scheme: lm_head's input range is calibrated from the model's own tail
(final norm, OPT's project_out, ...) run on the walk's last fp outputs (model/tail_inputs.py), and equals
the max |input| of lm_head in a plain forward of the fp model over the same calibration ids."""

import copy

import pytest
import torch
import transformers as tf

from auto_round import AutoRound
from tiny_models import CONFIGS, random_ids, tiny_tokenizer


def untied(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = CONFIGS[arch]()
    config.tie_word_embeddings = False
    return tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def lm_head_input_max(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """The independent reference: max |x| of lm_head's input in the fp model's forward over `ids`."""
    seen = []
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda _m, a: seen.append(a[0].abs().amax()))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    handle.remove()
    return float(torch.stack(seen).amax())


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_lm_head_static_input_range_is_the_fp_models(arch):
    model = untied(arch)
    ids = random_ids(6, 16, seed=1)
    expected = lm_head_input_max(copy.deepcopy(model), ids)
    ar = AutoRound(model, tiny_tokenizer(), scheme="FP8_STATIC", iters=0, quant_lm_head=True, dataset=ids,
                   batch_size=4, low_cpu_mem_usage=False)  # 6 samples in batches of 4: a short last batch
    ar.quantize()
    got = ar.results["lm_head"].act_max
    assert got is not None and float(got) == pytest.approx(expected, rel=1e-5)
    assert ar._tail_chain is None  # the chain is dropped once used


def test_lm_head_static_range_after_signround_and_export(tmp_path):
    """The SignRound walk keeps its last fp outputs too; the exported lm_head.input_scale is max / 448 and
    the immediate-packing run (blocks released before lm_head) gives the same."""
    from safetensors import safe_open

    ids = random_ids(4, 16, seed=2)
    expected = lm_head_input_max(untied("llama"), ids)
    for low_mem in (False, True):
        ar = AutoRound(untied("llama"), tiny_tokenizer(), scheme="FP8_STATIC", iters=2, quant_lm_head=True,
                       dataset=ids, batch_size=2, low_cpu_mem_usage=low_mem)
        ar.quantize_and_save(tmp_path / str(low_mem), format="llm_compressor")
        with safe_open(str(tmp_path / str(low_mem) / "model.safetensors"), "pt") as f:
            scale = float(f.get_tensor("lm_head.input_scale").float().reshape(()))
        assert scale == pytest.approx(expected / 448.0, rel=1e-3)  # stored in the checkpoint's scale dtype


def test_nvfp4_lm_head_quantizes():
    """NVFP4's static activation global scale on lm_head (failed before: no calibrated act_max)."""
    ids = random_ids(4, 16, seed=3)
    expected = lm_head_input_max(untied("qwen3"), ids)
    ar = AutoRound(untied("qwen3"), tiny_tokenizer(), scheme="NVFP4", iters=0, quant_lm_head=True, dataset=ids,
                   low_cpu_mem_usage=False)
    ar.quantize()
    assert float(ar.results["lm_head"].act_max) == pytest.approx(expected, rel=1e-5)
