"""enable_adam (the reference's AdamRound / AutoRoundAdam): AdamW steps instead of signed ones, at the same
learning rates with the same linear decay."""

from __future__ import annotations

import json

import pytest
import torch

import auto_round
from auto_round import AutoRound
from auto_round.algorithms.signround import SignRoundConfig
from auto_round.cli.main import build_parser
from auto_round.model.memory_plan import optimizer_state_bytes
from tiny_models import random_ids, tiny_model

ITERS = 6


def _tuned(tmp_path, name, **kw):
    ar = AutoRound(tiny_model("llama"), dataset=random_ids(8, 16), nsamples=8, seqlen=16, bits=2, group_size=32,
                   iters=ITERS, batch_size=4, **kw)
    ar.quantize_and_save(tmp_path / name)
    return (tmp_path / name / "model.safetensors").read_bytes(), ar


def test_adamw_steps_at_the_decayed_learning_rates(tmp_path, monkeypatch):
    """Every block is stepped by torch's AdamW (its defaults), rounding and clip parameters in two groups whose
    learning rates follow lr * (1 - it / iters), the documented schedule of the signed steps."""
    seen = []
    original = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append([(g["lr"], g["weight_decay"], g["betas"]) for g in self.param_groups])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    adam, ar = _tuned(tmp_path, "adam", enable_adam=True)
    plain, _ = _tuned(tmp_path, "plain")
    assert adam != plain
    lr, mm_lr = ar.tuning.resolved_lr, ar.tuning.resolved_minmax_lr
    assert len(seen) == 2 * ITERS  # two blocks
    for i, groups in enumerate(seen):
        decay = 1 - (i % ITERS) / ITERS
        assert [g[0] for g in groups] == pytest.approx([lr * decay, mm_lr * decay])
        assert all(g[1] == 0.01 and g[2] == (0.9, 0.999) for g in groups)
    assert all(st.loss_best <= st.loss_first for st in ar.block_stats.values())
    qconfig = json.loads((tmp_path / "adam" / "quantization_config.json").read_text())
    assert qconfig["enable_adam"] is True
    assert "enable_adam" not in json.loads((tmp_path / "plain" / "quantization_config.json").read_text())


def test_settings_and_entry_points():
    with pytest.raises(ValueError, match="momentum is SignSGD's"):
        AutoRound(tiny_model("llama"), dataset=random_ids(8, 16), iters=2, momentum=0.5, enable_adam=True)
    assert build_parser().parse_args(["m", "--enable_adam"]).enable_adam is True
    assert build_parser().parse_args(["m"]).enable_adam is False
    ar = auto_round.AutoRoundAdam(tiny_model("llama"), dataset=random_ids(8, 16), iters=2)
    assert ar.tuning.enable_adam is True
    assert optimizer_state_bytes(SignRoundConfig(iters=2)) == 0
    assert optimizer_state_bytes(SignRoundConfig(iters=2, momentum=0.9)) == 4
    assert optimizer_state_bytes(SignRoundConfig(iters=2, enable_adam=True)) == 8
