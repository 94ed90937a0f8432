"""Packed blocks wait for the export on disk (model/packed_spill.py), not in memory."""

import pytest
import torch

from auto_round import AutoRound
from auto_round.model import packed_spill
from auto_round.model.memory import _private_file_mapping
from auto_round.model.packed_spill import PackedSpill, PackedSpillError, spill_dir_for
from test_low_mem import resident_pages
from tiny_models import random_ids, tiny_model


def _layers():
    gen = torch.Generator().manual_seed(0)
    return {
        "a.q_proj": {"a.q_proj.qweight": torch.randint(-2**31, 2**31 - 1, (64, 1024), dtype=torch.int32, generator=gen),
                     "a.q_proj.scales": torch.randn(8, 1024, generator=gen).half()},
        "a.k_proj": {"a.k_proj.qweight": torch.randint(0, 255, (32, 4096), dtype=torch.int32, generator=gen)},
    }


def test_put_returns_the_same_tensors_mapped_from_the_file_and_not_resident(tmp_path):
    spill = PackedSpill.start(tmp_path / ".out.packed")
    layers = _layers()
    mapped = spill.put(layers)
    assert mapped.keys() == layers.keys()
    big = mapped["a.q_proj"]["a.q_proj.qweight"]
    assert _private_file_mapping(big.data_ptr())  # backed by the file, not by anonymous memory
    assert resident_pages(big) == 0  # nothing read back yet
    for name, packed in layers.items():
        assert mapped[name].keys() == packed.keys()
        for key, tensor in packed.items():
            assert mapped[name][key].dtype == tensor.dtype and torch.equal(mapped[name][key], tensor), key
    assert len(list(spill.directory.glob("*.safetensors"))) == 1
    spill.put({"b": {"b.qweight": torch.ones(4, dtype=torch.int32)}})
    assert len(list(spill.directory.glob("*.safetensors"))) == 2
    spill.remove()
    assert not spill.directory.exists()
    assert torch.equal(big, layers["a.q_proj"]["a.q_proj.qweight"])  # the map outlives the file


def test_packed_forms_other_than_tensors_stay_in_memory(tmp_path):
    import numpy as np

    spill = PackedSpill.start(tmp_path / ".out.packed")
    gguf = {"blocks": np.arange(12, dtype=np.uint8), "qtype": "q4_0"}
    assert spill.put({"x": gguf}) == {"x": gguf} and not list(spill.directory.iterdir())
    mixed = spill.put({"x": gguf, **_layers()})
    assert mixed["x"] is gguf and _private_file_mapping(mixed["a.k_proj"]["a.k_proj.qweight"].data_ptr())


def test_a_stale_work_directory_is_replaced_but_foreign_files_are_never_deleted(tmp_path):
    stale = tmp_path / ".out.packed"
    stale.mkdir()
    (stale / "00000.safetensors").write_bytes(b"half written")
    (stale / ".tmp3QgAJY").write_bytes(b"killed inside save_file")  # safetensors' temporary name
    spill = PackedSpill.start(stale)
    assert list(spill.directory.iterdir()) == []
    (stale / "notes.txt").write_text("mine")
    with pytest.raises(PackedSpillError, match="notes.txt"):
        PackedSpill.start(stale)
    assert (stale / "notes.txt").read_text() == "mine"


def test_a_failed_write_names_the_directory_and_the_way_out(tmp_path, monkeypatch):
    spill = PackedSpill.start(tmp_path / ".out.packed")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(packed_spill, "save_file", full_disk)
    with pytest.raises(PackedSpillError, match=r"MiB of packed layers to .*No space left.*disable_low_cpu_mem_usage"):
        spill.put(_layers())


def _autoround(**kw):
    return AutoRound(tiny_model("llama"), dataset=random_ids(), nsamples=4, seqlen=16, batch_size=2, iters=1,
                     group_size=32, **kw)


def test_quantize_and_save_spills_every_block_and_removes_the_work_directory(tmp_path):
    ar = _autoround()
    out = tmp_path / "out"
    ar.quantize_and_save(out)
    assert (out / "model.safetensors").is_file() and not spill_dir_for(out).exists()
    qweight = ar.packed["model.layers.1.mlp.down_proj"]["model.layers.1.mlp.down_proj.qweight"]
    assert _private_file_mapping(qweight.data_ptr())


def test_the_work_directory_goes_when_the_export_fails(tmp_path, monkeypatch):
    ar = _autoround()
    seen = []

    def failing_save(*args, **kwargs):
        seen.append(sorted(p.name for p in spill_dir_for(tmp_path / "out").iterdir()))
        raise RuntimeError("export broke")

    monkeypatch.setattr(ar, "save_quantized", failing_save)
    with pytest.raises(RuntimeError, match="export broke"):
        ar.quantize_and_save(tmp_path / "out")
    assert seen and len(seen[0]) == 2  # one file per block of the tiny model existed during the run
    assert not spill_dir_for(tmp_path / "out").exists()


def test_without_low_cpu_mem_usage_nothing_is_spilled(tmp_path):
    ar = _autoround(low_cpu_mem_usage=False)
    ar.quantize_and_save(tmp_path / "out")
    assert not ar.packed and not spill_dir_for(tmp_path / "out").exists()
