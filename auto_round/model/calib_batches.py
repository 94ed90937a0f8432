"""Pre-tokenized calibration data: a torch DataLoader (or a list) of token batches -> token ids [n, T]."""

from __future__ import annotations

import logging
from typing import Any

import torch

from .calib_data import CalibrationDataError

logger = logging.getLogger("auto_round")

__all__ = ["ids_from_batches"]


def ids_from_batches(batches: Any, *, nsamples: int, seqlen: int) -> torch.Tensor:
    """Token ids [n, T] from an iterable of pre-tokenized batches (a torch DataLoader), n <= nsamples.

    A batch is a LongTensor [b, T] (or one sample [T]), a mapping with "input_ids" [b, T] and optionally
    "attention_mask" [b, T] (only the positions it marks are kept, so left or right padding is dropped), or a
    list / tuple whose first item is such a tensor (a TensorDataset's batches). Samples are cut to seqlen, and all
    to the shortest one, so every sample is real tokens (logged when that drops tokens). Reading stops once
    nsamples samples are in. Raises CalibrationDataError for another batch type or no usable sample.
    """
    samples: list[torch.Tensor] = []
    for batch in batches:
        for ids in _batch_rows(batch):
            if ids.numel() >= 2:
                samples.append(ids[:seqlen])
            if len(samples) == nsamples:
                break
        if len(samples) == nsamples:
            break
    if not samples:
        raise CalibrationDataError("the calibration DataLoader yields no sample of at least 2 tokens")
    length = min(s.numel() for s in samples)
    dropped = sum(s.numel() - length for s in samples)
    if dropped:
        logger.info("calibration batches: %d samples cut to the shortest one's %d tokens (%d tokens left out)",
                    len(samples), length, dropped)
    return torch.stack([s[:length] for s in samples]).long()


def _batch_rows(batch: Any) -> list[torch.Tensor]:
    """The samples of one pre-tokenized batch as 1-D id tensors (see ids_from_batches)."""
    mask = None
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        batch = batch[0]
    elif isinstance(batch, dict) or hasattr(batch, "keys"):
        if "input_ids" not in batch:
            raise CalibrationDataError(f"a calibration batch mapping needs 'input_ids', got keys {sorted(batch.keys())}")
        batch, mask = batch["input_ids"], batch.get("attention_mask")
    if not isinstance(batch, torch.Tensor) or batch.dim() not in (1, 2) or batch.is_floating_point():
        raise CalibrationDataError(
            f"unsupported calibration batch {type(batch).__name__}"
            f"{tuple(batch.shape) if isinstance(batch, torch.Tensor) else ''}: a DataLoader must yield token id "
            "tensors [batch, seq], dicts with 'input_ids', or tuples whose first item is the ids")
    ids = batch.reshape(1, -1) if batch.dim() == 1 else batch
    if mask is None:
        return list(ids)
    keep = torch.as_tensor(mask).reshape(ids.shape).bool()
    return [row[k] for row, k in zip(ids, keep)]
