"""The glue between AutoRound's SignRound block walk and the checkpoint directory (model/checkpoint_resume.py).

compressor.py / compressor_walk.py call only: RunCheckpoint.start (quantize_and_save, before tuning), bind (calibration built),
restore (before the walk), save (after each block), remove (after a successful export). Ctrl-C during the
walk is deferred: the current block finishes, its checkpoint is written, then QuantizationInterrupted is
raised (CLI exit code 130); a second Ctrl-C aborts at once.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import signal
import threading
from pathlib import Path
from typing import Any, Optional

import torch

from ..version import __version__
from .checkpoint_resume import BlockCheckpoint, ResumedRun, check_checkpoint_dir, checkpoint_dir_for, model_identity

logger = logging.getLogger("auto_round")


class QuantizationInterrupted(KeyboardInterrupt):
    """Ctrl-C during tuning: the finished blocks are checkpointed; rerun with resume=True (CLI: --resume)."""


class RunCheckpoint:
    def __init__(self, directory: Path, base_parts: dict, resume: bool):
        self.directory, self.base_parts, self.resume = directory, base_parts, resume
        self.store: Optional[BlockCheckpoint] = None
        self._interrupted = False
        self._old_handler = None

    @classmethod
    def start(cls, ar: Any, output_dir: "str | Path", overwrite: bool) -> "RunCheckpoint":
        """Check the work directory and fingerprint the model before anything is modified."""
        check_checkpoint_dir(output_dir, ar.resume, overwrite)
        directory = checkpoint_dir_for(output_dir)
        if directory.exists() and not ar.resume:  # overwrite: the stale checkpoint is discarded
            BlockCheckpoint(directory, {}).remove()
        t = ar.tuning
        # recompute_qdq changes memory, not results: a resume may differ in it (the memory planner may too)
        tuning = {**{k: v for k, v in dataclasses.asdict(t).items() if k != "recompute_qdq"}, "amp_dtype": str(t.amp_dtype), "enable_quanted_input": ar.enable_quanted_input,
                  "amp_attention": ar.amp_attention, "scale_dtype": str(ar.scale_dtype), "nsamples": ar.nsamples,
                  "seqlen": ar.seqlen, "device_type": torch.device(ar.device).type, "block_groups": ar.block_groups}
        parts = {
            "model": model_identity(ar.source_dir, ar.model),
            "scheme": ar.scheme.to_dict(),
            "layers": {n: s.to_dict() for n, s in sorted(ar.layer_schemes.items())},
            "tuning": tuning,
            "versions": {"auto_round": __version__, "torch": torch.__version__},
        }
        return cls(directory, parts, ar.resume)

    def bind(self, calibration_info: Optional[dict]) -> "RunCheckpoint":
        self.store = BlockCheckpoint(self.directory, {**self.base_parts, "calibration": calibration_info})
        if threading.current_thread() is threading.main_thread():
            self._old_handler = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def _on_sigint(self, signum, frame) -> None:
        if self._interrupted:
            raise KeyboardInterrupt
        self._interrupted = True
        logger.warning("Ctrl-C: finishing the current block and saving a resumable state (Ctrl-C again aborts now)")

    def restore_sigint(self) -> None:
        if self._old_handler is not None:
            signal.signal(signal.SIGINT, self._old_handler)
            self._old_handler = None

    def restore(self, ar: Any, rng: random.Random) -> Optional[ResumedRun]:
        """With resume: load the done blocks into `ar` (results, weights, stats) and `rng`; None if nothing to resume."""
        if not self.resume:
            return None
        from ..algorithms.signround import BlockTuneStats, install_act_quantizers

        done = self.store.load()
        if done is None:
            logger.info("resume: no checkpoint in %s, starting from the first block", self.directory)
            return None
        for block in done.done:
            if ar._pending is not None:  # restored weights go into converted tensors, never rounded to the stored dtype
                ar._pending.convert(block)
            layers = ar._block_layers(block)
            with torch.no_grad():
                for name, (module, _) in layers.items():
                    module.weight.copy_(done.weights[name])
            for name in layers:
                ar.results[name] = done.results[name]
            act_max = {n: r.act_max for n, r in done.results.items() if getattr(r, "act_max", None) is not None}
            install_act_quantizers(layers, act_max, tune_clip=False, scale_dtype=ar.scale_dtype)
        ar.block_stats.update({n: BlockTuneStats(**s) for n, s in done.block_stats.items()})
        rng.setstate(done.rng_state)
        logger.info("resume: %d block(s) done in %s, continuing after %s", len(done.done), self.directory, done.done[-1])
        return done

    def save(self, ar: Any, block: str, layers: dict, fp_in: torch.Tensor, q_in: Optional[torch.Tensor],
             rng: random.Random, extra: Optional[dict] = None) -> None:
        results = {n: ar.results[n] for n in layers}
        weights = {n: m.weight for n, (m, _) in layers.items()}
        stats = {n: dataclasses.asdict(s) for n, s in ar.block_stats.items()}
        self.store.save_block(block, results, weights, fp_in, q_in, rng.getstate(), stats, extra)
        if self._interrupted:
            self.restore_sigint()
            raise QuantizationInterrupted(
                f"interrupted after block {block}; the finished blocks are saved in {self.directory}: "
                "run the same command again with --resume (AutoRound(..., resume=True)) to continue")

    def remove(self) -> None:
        self.restore_sigint()
        if self.store is not None:
            self.store.remove()
