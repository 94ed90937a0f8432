"""SignSGD momentum (the reference's --momentum, torch SGD's buffer without dampening) in SignRound's step."""

from __future__ import annotations

import pytest
import torch

from auto_round import AutoRound
from auto_round.algorithms.signround import _signed_step
from auto_round.cli.main import build_parser
from tiny_models import random_ids, tiny_model


def test_step_follows_the_sign_of_the_momentum_buffer():
    p = torch.zeros(3, requires_grad=True)
    buffers: dict = {}
    g1, g2 = torch.tensor([1.0, -1.0, 2.0]), torch.tensor([-0.5, -0.5, -3.0])
    p.grad = g1.clone()
    _signed_step([p], 0.1, 0.9, buffers)
    assert torch.allclose(p.detach(), torch.tensor([-0.1, 0.1, -0.1]))  # the first buffer is the gradient
    p.grad = g2.clone()
    _signed_step([p], 0.1, 0.9, buffers)
    # buf = 0.9 * g1 + g2 = [0.4, -1.4, -1.2]: the first element keeps moving down although its gradient says up
    assert torch.allclose(p.detach(), torch.tensor([-0.2, 0.2, 0.0]))
    q = torch.zeros(3, requires_grad=True)
    q.grad = g2.clone()
    _signed_step([q], 0.1)  # no momentum: the gradient's own sign
    assert torch.allclose(q.detach(), torch.full((3,), 0.1))


def _tuned(tmp_path, name, **kw):
    ar = AutoRound(tiny_model("llama"), dataset=random_ids(8, 16), nsamples=8, seqlen=16, bits=2, group_size=32,
                   iters=12, batch_size=2, **kw)
    ar.quantize_and_save(tmp_path / name)
    return (tmp_path / name / "model.safetensors").read_bytes(), ar


def test_momentum_changes_the_tuning_and_zero_is_the_default(tmp_path):
    plain, _ = _tuned(tmp_path, "plain")
    zero, _ = _tuned(tmp_path, "zero", momentum=0.0)
    moved, ar = _tuned(tmp_path, "moved", momentum=0.9)
    assert zero == plain and moved != plain
    assert ar.tuning.momentum == 0.9 and all(st.loss_best <= st.loss_first for st in ar.block_stats.values())
    for bad in (-0.1, 1.0, float("nan"), True):
        with pytest.raises(ValueError, match="momentum must be a number in"):
            AutoRound(tiny_model("llama"), dataset=random_ids(8, 16), iters=2, momentum=bad)
    assert build_parser().parse_args(["m", "--momentum", "0.5"]).momentum == 0.5


def test_the_memory_plan_counts_the_buffers():
    from auto_round.model.memory_plan import MemoryShape, estimate_signround_memory
    import dataclasses

    shape = MemoryShape(nsamples=8, seqlen=16, hidden=64, intermediate=128, heads=4, dtype_bytes=4,
                        weight_bytes=10**6, block_weight_elems=10**5, block_groups=100, packed_bytes=10**4)
    plain = estimate_signround_memory(shape, 4)
    with_buffers = estimate_signround_memory(dataclasses.replace(shape, momentum_bytes_per_weight=4), 4)
    assert with_buffers.block_state - plain.block_state == 4 * 10**5
