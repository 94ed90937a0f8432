"""A torch DataLoader of pre-tokenized batches as calibration data (model/calib_batches.ids_from_batches), as the
reference's docs allow: read into token ids [n, T] once, then used like a tensor dataset."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from auto_round import AutoRound
from auto_round.model.calib_batches import ids_from_batches
from auto_round.model.calib_data import CalibrationDataError
from tiny_models import random_ids, tiny_model


def test_batch_forms_masks_and_limits():
    ids = torch.arange(40).reshape(4, 10)
    assert torch.equal(ids_from_batches([ids], nsamples=8, seqlen=16), ids)
    assert torch.equal(ids_from_batches([ids[:2], ids[2:]], nsamples=3, seqlen=6), ids[:3, :6])  # nsamples, seqlen
    assert torch.equal(ids_from_batches(DataLoader(TensorDataset(ids), batch_size=3), nsamples=8, seqlen=16), ids)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0  # left padding of the first sample
    got = ids_from_batches([{"input_ids": ids[:2], "attention_mask": mask}], nsamples=8, seqlen=16)
    assert torch.equal(got, torch.stack([ids[0, 3:], ids[1, :7]]))  # padding dropped, cut to the shortest
    assert torch.equal(ids_from_batches([ids[0], ids[1]], nsamples=8, seqlen=16), ids[:2])  # 1-D samples


@pytest.mark.parametrize("bad, match", [([torch.rand(2, 8)], "unsupported calibration batch"),
                                        ([{"ids": torch.ones(2, 8)}], "needs 'input_ids'"),
                                        (["some text"], "unsupported calibration batch str"),
                                        ([torch.ones(3, 1, dtype=torch.long)], "no sample of at least 2 tokens")])
def test_bad_batches_are_named(bad, match):
    with pytest.raises(CalibrationDataError, match=match):
        ids_from_batches(bad, nsamples=4, seqlen=8)


def test_a_dataloader_calibrates_like_the_same_ids_as_a_tensor(tmp_path):
    ids = random_ids(8, 16)
    loader = DataLoader([{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids], batch_size=4)
    outs = []
    for name, data in (("tensor", ids), ("loader", loader)):
        ar = AutoRound(tiny_model("llama"), dataset=data, iters=2, nsamples=8, seqlen=16, batch_size=4)
        ar.quantize_and_save(tmp_path / name)
        outs.append((tmp_path / name / "model.safetensors").read_bytes())
    assert outs[0] == outs[1]


def test_a_list_of_token_dicts_or_tensors_is_read_the_same_way():
    ids = random_ids(8, 16)
    for data in ([{"input_ids": row.unsqueeze(0)} for row in ids], list(ids)):
        ar = AutoRound(tiny_model("llama"), dataset=data, iters=0, nsamples=8, seqlen=16)
        assert torch.equal(ar.dataset, ids)
