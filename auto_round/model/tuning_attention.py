"""A faster attention for the bf16/fp16 tuning forward on CPU.

With autocast, SignRound's block forward runs its linears in bf16, but attention stays in fp32: the
rotary embedding (fp32 cos/sin) promotes the bf16 queries and keys back. On CPU, torch's flash-attention
kernel (what transformers' "sdpa" calls) spends ~33 ms per step of SmolLM2 (8 x 256 tokens, 9 heads) in
forward + backward; the same attention in the autocast dtype, as two batched matmuls and a softmax,
takes ~15 ms. Key/value heads are not repeated for grouped-query attention: the query heads that
share a key/value head are stacked along the sequence axis instead.

The numbers differ from sdpa by bf16 rounding of the attention probabilities (sdpa keeps them in fp32):
RMS 7e-4 against 4e-4 for sdpa, on unit-variance inputs against an fp64 reference. Targets and the
outputs handed to the next block never use it (they run at full precision, outside autocast).

`tuning_attention(model)` switches the model's "sdpa" attention to this function for the duration of a
with-block. It reads the same arguments sdpa does (mask None = causal, bool or additive float masks) and
hands anything else (fp32 inputs, dropout, softcap, position bias) to sdpa unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

NAME = "auto_round_tuning"
_FAST_DTYPES = (torch.bfloat16, torch.float16)


def _sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _compute_dtype(query: torch.Tensor) -> torch.dtype:
    """The autocast dtype where autocast is on: rotary embeddings promote bf16 queries back to fp32."""
    device = query.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return query.dtype


def _additive_bias(mask: Optional[torch.Tensor], causal: bool, q_len: int, kv_len: int,
                   dtype: torch.dtype, device: torch.device) -> Optional[torch.Tensor]:
    """[b|1, h|1, q_len, kv_len] bias added to the scores; finite minimum so fully masked rows stay finite."""
    low = torch.finfo(dtype).min
    if mask is None:
        if not causal:
            return None
        allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)
        return torch.zeros((), dtype=dtype, device=device).masked_fill(~allowed, low).view(1, 1, q_len, kv_len)
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, low)
    return mask.to(dtype).clamp(min=low)


def grouped_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention with transformers' interface: query [b, h, s, d], key/value [b, h_kv, l, d] -> [b, s, h, d].

    Same semantics as transformers' sdpa_attention_forward for the arguments it reads.
    """
    dtype = _compute_dtype(query)
    fallback = (dtype not in _FAST_DTYPES or query.device.type != "cpu" or dropout
                or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None
                or key.shape[-1] != value.shape[-1] or query.shape[1] % key.shape[1])
    if fallback:
        return _sdpa()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                       is_causal=is_causal, **kwargs)
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    b, h, s, d = query.shape
    h_kv, kv_len = key.shape[1], key.shape[2]
    group = h // h_kv
    causal = (is_causal if is_causal is not None else getattr(module, "is_causal", True)) and s > 1 and attention_mask is None
    if causal and kv_len > s:  # sdpa's rule: a causal call without a mask sees the first s keys
        key, value, kv_len = key[:, :, :s], value[:, :, :s], s
    scale = scaling if scaling is not None else d ** -0.5
    # query heads h = j * group + g use key/value head j (repeat_kv order): stack them along the sequence
    q = query.reshape(b, h_kv, group * s, d)
    scores = torch.matmul(q, key.transpose(-1, -2)).view(b, h_kv, group, s, kv_len) * scale
    bias = _additive_bias(attention_mask, causal, s, kv_len, scores.dtype, scores.device)
    if bias is not None:
        bias = bias.view(bias.shape[0], 1, 1, s, kv_len) if bias.shape[1] == 1 else bias.view(bias.shape[0], h_kv, group, s, kv_len)
        scores = scores + bias
    probs = torch.softmax(scores, dim=-1).view(b, h_kv, group * s, kv_len)
    out = torch.matmul(probs, value).view(b, h, s, d)
    return out.transpose(1, 2).contiguous(), None


def _register() -> bool:
    try:
        from transformers import AttentionInterface
    except ImportError:  # pragma: no cover - transformers without the registry
        return False
    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, grouped_attention)
    return True


@contextlib.contextmanager
def tuning_attention(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, modules of `module` configured for "sdpa" use `grouped_attention`."""
    configs = {id(c): c for m in module.modules() for c in [getattr(m, "config", None)]
               if c is not None and getattr(c, "_attn_implementation", None) == "sdpa"}
    if not enabled or not configs or not _register():
        yield
        return
    try:
        for config in configs.values():
            config._attn_implementation = NAME
        yield
    finally:
        for config in configs.values():
            config._attn_implementation = "sdpa"
