"""Where and in which precision to compute: device spellings and the bf16-autocast default."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Optional

import torch

from .model.loading import parse_dtype


def fast_bf16(device: str) -> bool:
    """Whether bf16 matmuls are faster than fp32 on `device`: CUDA with bf16 support, or a CPU with
    AVX512-BF16 / AMX-BF16 (measured here on AVX512-BF16: 2.1-2.4x the fp32 GEMM rate; without those
    instructions bf16 is emulated and several times slower than fp32)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind != "cpu":
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:  # not Linux: no cheap way to tell, keep fp32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_amp_dtype(amp: Optional[bool], amp_dtype: "str | torch.dtype", device: str) -> Optional[torch.dtype]:
    """The autocast dtype of the tuning matmuls, or None (compute in the model's dtype).

    amp=None (default) turns it on where bf16 is fast (`fast_bf16`); True / False force it.
    """
    dtype = parse_dtype(amp_dtype)
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"amp_dtype must be bf16 or fp16, got {amp_dtype!r}")
    if amp is None:
        amp = dtype == torch.bfloat16 and fast_bf16(device)
    return dtype if amp else None


def resolve_device(device: Optional[str], device_map: Any) -> str:
    """One torch device string from the reference's `device` / `device_map` spellings.

    "0" / 0 / "0,1" -> "cuda:0" (first listed card; falls back to "cpu" without CUDA), "auto" / None ->
    "cuda" when present else "cpu", anything else ("cpu", "cuda:1", "xpu") is passed through.
    """
    spec = device if device is not None else device_map
    if isinstance(spec, int):
        spec = str(spec)
    if isinstance(spec, str):
        spec = spec.split(",")[0].strip()
        if spec.isdigit():
            return f"cuda:{spec}" if torch.cuda.is_available() else "cpu"
        if spec and spec != "auto":
            return check_device(spec)
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(spec: str) -> str:
    """`spec` if torch can use it here; a ValueError naming what is available otherwise."""
    try:
        dev = torch.device(spec)
    except RuntimeError as err:
        raise ValueError(f"device {spec!r} is not a torch device ({err}); use cpu, cuda, cuda:N, xpu, ...") from err
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {spec!r}: no CUDA device is available here; use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {spec!r}: only {count} CUDA device(s) here (cuda:0..cuda:{count - 1})")
    return spec


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool, device: str) -> Iterator[None]:
    """With `enabled`, torch.use_deterministic_algorithms(True) while the block runs (an op without a deterministic
    implementation raises instead of running), then the previous setting is restored.

    On CUDA, cuBLAS is deterministic only with a fixed workspace: CUBLAS_WORKSPACE_CONFIG=":4096:8" is set for the
    process when it is not set yet (it must be before cuBLAS starts; torch raises on the first matmul otherwise).
    On CPU the tuning is already deterministic (tests/test_determinism.py); the switch only adds the checks.
    """
    if not enabled:
        yield
        return
    if torch.device(device).type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
