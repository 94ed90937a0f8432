"""Immediate packing (low_cpu_mem_usage): the same checkpoint as packing at the end, with weights released."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from auto_round import AutoRound
from auto_round.export.writer import ExportError
from auto_round.model.memory import drop_file_backed_pages, release_weight
from tiny_models import random_ids, tiny_model

MIXED = {"model.layers.0.mlp.down_proj": {"bits": 8}, "o_proj": {"bits": 16}}


def save(tmp_path, tag, low_mem, fmt="auto_round", **kw):
    ar = AutoRound(tiny_model("llama"), dataset=random_ids(), nsamples=4, seqlen=16, batch_size=2,
                   low_cpu_mem_usage=low_mem, **{"iters": 2, "group_size": 32, **kw})
    out = tmp_path / tag
    ar.quantize_and_save(out, format=fmt)
    return ar, out


@pytest.mark.parametrize("kw", [
    {},                                                        # sym W4 -> auto_gptq packing
    {"sym": False},                                            # asym W4 -> auto_awq packing
    {"bits": 2, "sym": False, "layer_config": MIXED},          # plain packing, mixed bits, an fp layer
    {"iters": 0, "disable_opt_rtn": True, "quant_lm_head": True},  # RTN, lm_head packed at the end
    {"iters": 0},                                              # opt-RTN
])
def test_immediate_packing_writes_the_same_checkpoint(tmp_path, kw):
    ar_low, low = save(tmp_path, "low", True, **kw)
    _, full = save(tmp_path, "full", False, **kw)
    a, b = load_file(str(low / "model.safetensors")), load_file(str(full / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert json.loads((low / "config.json").read_text()) == json.loads((full / "config.json").read_text())
    assert ar_low.packed and all(ar_low.results[n].codes is None for n in ar_low.packed)


def test_released_layers_are_meta_and_only_the_packed_format_can_be_written_again(tmp_path):
    ar, out = save(tmp_path, "low", True)
    q_proj = ar.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert q_proj.weight.is_meta and q_proj.weight.shape == (64, 64)
    assert not ar.model.get_submodule("model.layers.0.input_layernorm").weight.is_meta
    with pytest.raises(ExportError, match="released"):
        ar.save_quantized(tmp_path / "fake", format="fake")
    with pytest.raises(ExportError, match="released"):
        ar.save_quantized(tmp_path / "awq", format="auto_round:auto_awq")
    again = ar.save_quantized(tmp_path / "again", format="auto_round")[0]
    a, b = load_file(str(out / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_several_formats_or_quantize_alone_keep_the_model(tmp_path):
    ar, _ = save(tmp_path, "two", True, fmt="auto_round,fake")
    assert not ar.packed and not ar.model.get_submodule("model.layers.0.self_attn.q_proj").weight.is_meta
    ar = AutoRound(tiny_model("llama"), dataset=random_ids(), nsamples=4, seqlen=16, batch_size=2, iters=1, group_size=32)
    ar.quantize()
    assert not ar.packed and all(r.codes is not None for r in ar.results.values())


def test_file_backed_pages_are_dropped_and_read_back_from_the_file(tmp_path):
    path = tmp_path / "w.bin"
    values = np.arange(3 * 4096, dtype=np.float32)
    values.tofile(path)
    mapped = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c"))  # private copy-on-write map
    mapped[:] = -1.0  # written pages are private copies; dropping them reverts to the file
    released = drop_file_backed_pages(mapped)
    assert released >= 4096 * 4 * 2 and released % 4096 == 0
    pages = released // 4
    start = (-mapped.data_ptr() % 4096) // 4
    assert torch.equal(mapped[start : start + pages], torch.from_numpy(values[start : start + pages]))


def test_anonymous_memory_is_never_dropped():
    tensor = torch.arange(100_000, dtype=torch.float32)
    assert drop_file_backed_pages(tensor) == 0
    assert torch.equal(tensor, torch.arange(100_000, dtype=torch.float32))
    layer = torch.nn.Linear(8, 4)
    release_weight(layer)
    assert layer.weight.is_meta and layer.weight.shape == (4, 8) and not layer.bias.is_meta


def test_clean_file_pages_are_evicted_but_written_ones_never(tmp_path):
    from auto_round.model.memory import evict_clean_file_pages

    path = tmp_path / "w.bin"
    values = np.arange(4 * 4096, dtype=np.float32)
    values.tofile(path)
    mapped = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c"))
    assert float(mapped.sum()) == float(values.sum())  # every page resident, none written
    released = evict_clean_file_pages(mapped)
    assert released >= 4096 * 4 * 3 and released % 4096 == 0
    assert torch.equal(mapped, torch.from_numpy(values))  # read back from the file
    mapped[5000] = -7.0  # one page becomes a private copy: the only place the new value lives
    assert evict_clean_file_pages(mapped) == 0
    assert mapped[5000].item() == -7.0 and torch.equal(mapped[:5000], torch.from_numpy(values[:5000]))
    anonymous = torch.arange(100_000, dtype=torch.float32)
    assert evict_clean_file_pages(anonymous) == 0


def resident_pages(tensor: torch.Tensor) -> int:
    """Pages of the tensor's whole-page range present in memory (/proc/self/pagemap bit 63)."""
    first = -(-tensor.data_ptr() // 4096) * 4096
    last = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // 4096 * 4096
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(first // 4096 * 8)
        entries = np.frombuffer(pagemap.read((last - first) // 4096 * 8), dtype=np.uint64)
    return int(((entries >> np.uint64(63)) & np.uint64(1)).sum())


def test_check_finite_leaves_the_checkpoint_unresident(tmp_path):
    """Checking every weight for NaN must not page the whole memory-mapped checkpoint in."""
    from transformers import AutoModelForCausalLM

    from auto_round.model.loading import check_finite
    from auto_round.model.memory import _private_file_mapping

    tiny_model("llama").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    weight = model.get_submodule("model.layers.0.mlp.up_proj").weight.detach()
    if not _private_file_mapping(weight.data_ptr()):
        pytest.skip("this transformers copies the weights instead of mapping the file")
    before = weight.clone()  # reads every page
    assert resident_pages(weight) >= 2
    check_finite(model)
    assert resident_pages(weight) == 0
    assert torch.equal(weight, before)  # values unchanged: read back from the file


_FINITE_PEAK_SCRIPT = r"""
import json, sys, numpy as np, torch
from auto_round.model.loading import ModelLoadError, check_finite
path, bad_at = sys.argv[1], int(sys.argv[2])
weight = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c"))
module = torch.nn.Module()
module.big = torch.nn.Parameter(weight, requires_grad=False)
def hwm():
    return int(next(x for x in open("/proc/self/status") if x.startswith("VmHWM:")).split()[1]) * 1024
def rss():
    return int(next(x for x in open("/proc/self/status") if x.startswith("VmRSS:")).split()[1]) * 1024
warm = torch.nn.Module()
warm.w = torch.nn.Parameter(torch.ones(3 * 2**20), requires_grad=False)
check_finite(warm)  # lazy imports and the allocator's first slices do not count
del warm
open("/proc/self/clear_refs", "w").write("5")  # the high-water mark restarts here
base = rss()
try:
    check_finite(module)
    error = ""
except ModelLoadError as err:
    error = str(err)
print(json.dumps({"added_peak": hwm() - base, "error": error}))
"""


@pytest.mark.parametrize("bad_at", [-1, 15_000_000])
def test_check_finite_reads_big_tensors_slice_by_slice(tmp_path, bad_at):
    """A 64 MiB memory-mapped weight is scanned without paging it all in or allocating tensor-sized
    temporaries (a whole-tensor isfinite added ~2.5x its size to the peak), and a NaN in a late slice is found."""
    import subprocess
    import sys

    values = np.ones(16 * 2**20, dtype=np.float32)
    if bad_at >= 0:
        values[bad_at] = np.nan
    path = tmp_path / "big.bin"
    values.tofile(path)
    done = subprocess.run([sys.executable, "-c", _FINITE_PEAK_SCRIPT, str(path), str(bad_at)],
                          capture_output=True, text=True, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["added_peak"] < 40 * 2**20, report  # a few 4 MiB slices, not 64 MiB + temporaries (~180 MiB)
    assert ("big" in report["error"]) == (bad_at >= 0), report


def test_capture_hands_the_embedding_pages_back(tmp_path):
    """The capture pass reads the token embedding; its file pages must not stay resident for the block walk."""
    from transformers import AutoModelForCausalLM

    from auto_round.model.block_inputs import capture_block_inputs
    from auto_round.model.memory import _private_file_mapping

    tiny_model("llama").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    weight = model.get_input_embeddings().weight.detach()
    if not _private_file_mapping(weight.data_ptr()):
        pytest.skip("this transformers copies the weights instead of mapping the file")
    before = weight.clone()  # reads every page
    assert resident_pages(weight) >= 2
    ids = random_ids()[:4, :16]
    captured = capture_block_inputs(model, list(model.model.layers), ids, torch.ones_like(ids))
    assert resident_pages(weight) == 0
    assert torch.equal(weight, before)
    assert torch.equal(captured.hidden_states, before[ids])  # the captured inputs are the looked-up rows
