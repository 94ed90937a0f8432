"""Observability of the SignRound walk: a tqdm bar over blocks (with ETA), one log line per block, event records.

Per block: loss before -> after, seconds, peak RSS so far (resource.getrusage, MB), tuning tokens/s
(iterations run x samples per step x seqlen / seconds). The records become `events.jsonl` in the output
directory (export/report.py); they hold timings, so they are a run log, not part of the hashed artifact.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from typing import Any, Optional

logger = logging.getLogger("auto_round")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024


class RunLog:
    def __init__(self, n_blocks: int, settings: dict, disable_progress: bool = False,
                 events: Optional[list[dict]] = None):
        self.events: list[dict] = list(events or [])
        if not self.events:
            self.events.append({"event": "run_start", "time": time.time(), "settings": settings})
        else:
            self.events.append({"event": "resume", "time": time.time()})
        self._bar = None
        try:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=n_blocks, desc="blocks", unit="block", disable=disable_progress)
        except ImportError:  # tqdm comes with transformers; without it, the log lines remain
            pass
        self._t0 = time.perf_counter()

    def skip(self, n: int = 1) -> None:
        """Blocks restored from a checkpoint."""
        if self._bar is not None:
            self._bar.update(n)

    def block_start(self, name: str = "", iters: int = 0) -> None:
        self._t0 = time.perf_counter()
        self._iter_bar = None
        if self._bar is not None and not self._bar.disable and iters:
            from tqdm.auto import tqdm

            self._iter_bar = tqdm(total=iters, desc=name, unit="iter", leave=False)

    def on_iter(self, it: int, loss: float) -> None:
        """tune_block's per-iteration callback: the inner bar (iterations of the current block, with ETA)."""
        if getattr(self, "_iter_bar", None) is not None:
            self._iter_bar.update(1)
            if it % 10 == 0:
                self._iter_bar.set_postfix(loss=f"{loss:.3g}")

    def block_done(self, name: str, stats: Any, tokens: int, layer_errors: Optional[dict] = None) -> dict:
        seconds = time.perf_counter() - self._t0
        if getattr(self, "_iter_bar", None) is not None:
            self._iter_bar.close()
            self._iter_bar = None
        rec = {"event": "block", "name": name, "loss_first": getattr(stats, "loss_first", None),
               "loss_best": getattr(stats, "loss_best", None), "best_iter": getattr(stats, "best_iter", None),
               "iters_run": getattr(stats, "iters_run", None), "seconds": round(seconds, 3),
               "peak_rss_mb": round(peak_rss_mb(), 1), "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
               "layer_errors": layer_errors or {}}
        self.events.append(rec)
        if stats is not None:
            logger.info("%s: loss %.6f -> %.6f (iter %d), %.1f s, peak RSS %.0f MB, %.0f tokens/s", name,
                        rec["loss_first"], rec["loss_best"], rec["best_iter"], seconds, rec["peak_rss_mb"],
                        rec["tokens_per_s"] or 0.0)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{rec['loss_best']:.3g}" if stats is not None else "-")
        return rec

    def end(self) -> None:
        self.events.append({"event": "run_end", "time": time.time(), "peak_rss_mb": round(peak_rss_mb(), 1)})
        if self._bar is not None:
            self._bar.close()


def weight_snapshot(layers: dict) -> dict:
    """Copies of the fp weights of a block's layers (name -> (module, scheme)), for `relative_errors`."""
    return {n: m.weight.detach().float().clone() for n, (m, _) in layers.items()}


def relative_errors(layers: dict, before: dict) -> dict[str, float]:
    """||W_q - W||_F / ||W||_F per layer, from the fake-quantized weights now in the modules."""
    out = {}
    for n, (m, _) in layers.items():
        w = before[n]
        out[n] = float((m.weight.detach().float() - w).norm() / w.norm().clamp_min(1e-12))
    return out
