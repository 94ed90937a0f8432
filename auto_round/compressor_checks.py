"""Argument checks of `AutoRound` that need no model state: numbers, batch size, enable_alg_ext's schemes.

Each raises a ValueError / SchemeError that names the argument (and its CLI flag) before any work starts.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from .algorithms.alg_ext import supports_alg_ext
from .algorithms.autoscheme.spec import scheme_label
from .algorithms.fused import mixed_groups
from .schemes import QuantScheme, SchemeError

logger = logging.getLogger("auto_round")


def check_cap(massive_token_cap: float) -> float:
    """massive_token_cap as a float: finite and >= 0 (0 = the plain MSE loss)."""
    if isinstance(massive_token_cap, bool) or not isinstance(massive_token_cap, (int, float)) \
            or not math.isfinite(massive_token_cap) or massive_token_cap < 0:
        raise ValueError(f"massive_token_cap must be a finite number >= 0 (0 = plain MSE loss), got {massive_token_cap!r}")
    return float(massive_token_cap)


def check_momentum(momentum: float, enable_adam: bool = False) -> float:
    """SignSGD momentum as a float: finite, in [0, 1) (1 and above never forget a gradient); AdamW has its own."""
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not math.isfinite(momentum) \
            or not 0 <= momentum < 1:
        raise ValueError(f"momentum must be a number in [0, 1) (0 = plain signed steps; CLI --momentum), got {momentum!r}")
    if momentum and enable_adam:
        raise ValueError("momentum is SignSGD's; enable_adam tunes with AdamW, whose moments replace it (drop one)")
    return float(momentum)


def check_positive(allow_zero: tuple = (), **values: int) -> None:
    """Each value an int >= 1 (>= 0 for the names in allow_zero)."""
    for key, value in values.items():
        low = 0 if key in allow_zero else 1
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")


def resolve_batch_size(batch_size: Optional[int], *, nsamples: int, iters: int, dataset: Any) -> int:
    """None = the reference default, 8, clamped to nsamples; an explicit one larger than nsamples is an error when
    tuning from built calibration samples (every step would use them all). A tensor dataset sets its own count."""
    if batch_size is None:
        return min(8, nsamples)
    if iters > 0 and batch_size > nsamples and not isinstance(dataset, torch.Tensor):
        raise ValueError(f"batch_size={batch_size} is larger than nsamples={nsamples}: every step would use all "
                         f"samples; pass batch_size <= {nsamples} (CLI: --batch_size) or more samples")
    return batch_size


def check_alg_ext_iters(enable_alg_ext: bool, iters: int) -> None:
    if enable_alg_ext and iters == 0:
        raise ValueError("enable_alg_ext changes SignRound's tuning and needs iters > 0 (iters=0 is RTN / opt-RTN, "
                         "which already uses the imatrix scale search): pass iters > 0 or drop enable_alg_ext "
                         "(CLI: --enable_alg_ext)")


def keeps_alg_ext(scheme: QuantScheme, layer_schemes: Mapping[str, QuantScheme], block_groups: Sequence[str]) -> bool:
    """Whether enable_alg_ext stays on for this scheme: it needs a supported main scheme (else SchemeError); other
    in-block layers get plain SignRound (warned).

    GGUF: warned and turned off (False), not refused: our GGUF SignRound already is the reference's alg_ext GGUF
    algorithm (llama.cpp's imatrix-weighted search up front, no min/max tuning, V tuned), so a reference
    command line with --enable_alg_ext and a gguf scheme gets the same algorithm here."""
    if scheme.gguf is not None:
        logger.warning("enable_alg_ext: GGUF k-quants always search their scales with the imatrix and tune only V "
                       "(the reference's alg_ext GGUF path); the flag changes nothing for %s", scheme.gguf)
        return False
    if not supports_alg_ext(scheme):
        kind = f"{'asym ' if not scheme.sym else ''}{scheme.data_type} {scheme.bits}-bit"
        raise SchemeError(f"enable_alg_ext supports sym int, mx_fp / mx_int and nv_fp weights; the scheme is "
                          f"{kind}: drop enable_alg_ext (CLI: --enable_alg_ext) or use e.g. W2A16G64, MXFP4, NVFP4")
    prefixes = tuple(g + "." for g in block_groups)
    other = sorted(n for n, s in layer_schemes.items()
                   if s.is_quantized and n.startswith(prefixes) and not supports_alg_ext(s))
    if other:
        logger.warning("enable_alg_ext: %d layer(s) of another weight type are tuned without it: %s%s",
                       len(other), ", ".join(other[:5]), " ..." if len(other) > 5 else "")
    return True


def local_source_dir(model: Any) -> Optional[Path]:
    """The local folder the model was loaded from, if any (a path, or an nn.Module's config._name_or_path)."""
    name = model if isinstance(model, (str, Path)) else getattr(getattr(model, "config", None), "_name_or_path", None)
    if not name:
        return None
    path = Path(str(name)).expanduser()
    return path if path.is_dir() else None


def warn_mixed_fused(layer_schemes: Mapping[str, QuantScheme]) -> list[list[str]]:
    """Warn (once, with an example) when layer_config / fp_layers / the shape rule give the members of a fused
    group (q/k/v, gate/up of one parent) different schemes: transformers and our loader read such a checkpoint,
    but runtimes that concatenate the members into one weight (vLLM, SGLang) cannot. Returns the groups."""
    groups = mixed_groups(layer_schemes)
    if groups:
        example = ", ".join(f"{n.rpartition('.')[2]} {scheme_label(layer_schemes[n])}" for n in groups[0])
        logger.warning("%d fused group(s) have members with different schemes (layer_config, fp_layers or their "
                       "shapes), e.g. %s: %s: transformers and auto-round load this checkpoint; runtimes that fuse "
                       "q/k/v or gate/up into one matmul (vLLM, SGLang) do not", len(groups),
                       groups[0][0].rpartition(".")[0], example)
    return groups


def check_model_free_args(iters: int, disable_opt_rtn: Optional[bool], num_hidden_layers: Optional[int],
                          scheme: Any) -> None:
    """model_free is plain RTN from the files: no tuning, no opt-RTN search, no AutoScheme scoring (all need
    the model's forward), and no truncated config. ModelFreeError naming the setting."""
    from .algorithms.autoscheme import AutoScheme
    from .model.checkpoint_config import ModelFreeError

    if iters != 0:
        raise ModelFreeError(f"model_free is plain RTN and runs no model: iters must be 0, got {iters} "
                             "(drop --model_free to tune)")
    if disable_opt_rtn is False:
        raise ModelFreeError("model_free is plain RTN: opt-RTN's search needs the model's forward for its imatrix "
                             "(drop --model_free, or disable_opt_rtn=True)")
    if isinstance(scheme, AutoScheme):
        raise ModelFreeError("model_free cannot score an AutoScheme (the scoring runs the model); drop --model_free")
    if num_hidden_layers is not None:
        raise ModelFreeError("num_hidden_layers is not supported with model_free")


def check_model_free_layers(layer_schemes: Mapping[str, QuantScheme]) -> None:
    """After the layers are resolved: static activation ranges (calibrated by running the model) are refused."""
    from .algorithms.act_quant import needs_act_calibration
    from .model.checkpoint_config import ModelFreeError

    static = [n for n, s in layer_schemes.items() if needs_act_calibration(s)]
    if static:
        raise ModelFreeError(f"model_free runs no model, so it cannot calibrate the static activation ranges of "
                             f"{static[0]} ({scheme_label(layer_schemes[static[0]])}, {len(static)} layers); use a "
                             "weight-only or dynamic-activation scheme, or drop --model_free")
