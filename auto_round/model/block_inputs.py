"""Capture what each block receives, so blocks can be run one at a time.

One pass of the model over the calibration set records, for every block, the positional and keyword
arguments it is called with (attention masks, rotary position embeddings, ...), and for the first block
also its hidden states. Blocks are replaced by pass-throughs during the pass, so no block computes
anything; the pass stops at the last block, before the final norm and lm_head. Recording every
block (not just block 0) matters for models whose layers differ in their inputs, e.g. Gemma3's
sliding-window and global layers get different masks and rotary tables.

Per-sample tensors (leading dim = batch) are concatenated over calibration chunks and indexed by
sample later; shared ones (position ids / embeddings, or leading dim 1) are kept once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from .blocks import input_embedding
from .memory import evict_clean_file_pages

SHARED_KEYS = ("position_ids", "cache_position", "position_embeddings", "cu_seqlens")


class _StopForward(Exception):
    """Raised by the last block's recorder to end the capture pass early."""


class PerSample:
    """A tensor whose leading dim indexes calibration samples ([n, ...]); other tensors are shared."""

    __slots__ = ("data",)

    def __init__(self, data: torch.Tensor):
        self.data = data


def _map_tensors(obj: Any, fn: Callable[[Any], Any]) -> Any:
    if isinstance(obj, (torch.Tensor, PerSample)):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


@dataclass
class BlockCall:
    """Arguments of one block, other than the hidden states: PerSample-wrapped or shared tensors.

    output_is_tuple: whether the block returned a tuple when it last ran (`block_run.block_runner` records
    it); the tail pass (model/tail_inputs.py) stands in for blocks whose weights are gone and must answer
    the model's forward in the same form."""

    args: tuple
    kwargs: dict
    output_is_tuple: Optional[bool] = None

    def select(self, index: torch.Tensor, device: torch.device | str | None = None) -> tuple[tuple, dict]:
        """(args, kwargs) for the samples in `index` (a 1-D LongTensor), moved to `device`."""

        def pick(t: Any) -> torch.Tensor:
            t = t.data[index] if isinstance(t, PerSample) else t
            return t.to(device) if device is not None else t

        return _map_tensors(self.args, pick), _map_tensors(self.kwargs, pick)


def _merge_chunks(chunks: Sequence[tuple[tuple, dict]], chunk_sizes: Sequence[int], concat_cache: dict) -> BlockCall:
    """Concatenate per-sample tensors of several calibration chunks into one BlockCall.

    `concat_cache` is shared across blocks so a mask passed to every block is concatenated once.
    """
    first_args, first_kwargs = chunks[0]

    def merge(path_values: list, key: str | None) -> Any:
        head = path_values[0]
        kinds = {isinstance(v, torch.Tensor) for v in path_values}
        if len(kinds) > 1:
            # e.g. sdpa passes mask=None for a chunk without padding and a tensor for one with padding
            raise RuntimeError(
                f"block argument {key!r} is a tensor in some calibration chunks and not in others; "
                "capture all samples in one chunk (chunk_size=None)"
            )
        if isinstance(head, torch.Tensor):
            shared = key in SHARED_KEYS or head.dim() == 0
            batched = all(v.dim() > 0 and v.shape[0] == n for v, n in zip(path_values, chunk_sizes))
            if shared or not batched or (head.shape[0] == 1 and max(chunk_sizes) > 1):
                return head
            ids = tuple(id(v) for v in path_values)
            if ids not in concat_cache:  # the same mask is usually passed to many blocks
                concat_cache[ids] = PerSample(torch.cat(path_values, dim=0))
            return concat_cache[ids]
        if isinstance(head, (tuple, list)):
            merged = [merge([v[i] for v in path_values], key) for i in range(len(head))]
            return type(head)(merged)
        if isinstance(head, dict):
            return {k: merge([v[k] for v in path_values], k) for k in head}
        return head

    args = tuple(merge([c[0][i] for c in chunks], None) for i in range(len(first_args)))
    kwargs = {k: merge([c[1][k] for c in chunks], k) for k in first_kwargs}
    return BlockCall(args=args, kwargs=kwargs)


@dataclass
class CapturedInputs:
    """Hidden states entering the first block [n, T, H] and the call arguments of every block."""

    hidden_states: torch.Tensor
    calls: list[BlockCall]


def _hidden_from(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    if args:
        return args[0], args[1:], kwargs
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), args, kwargs


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    chunk_size: int | None = None,
    device: torch.device | str = "cpu",
    store_device: torch.device | str = "cpu",
    embedding_dtype: Optional[torch.dtype] = None,
) -> CapturedInputs:
    """Run the model on [n, T] token ids and record every block's inputs (see module docstring).

    embedding_dtype: when the token embedding (a plain nn.Embedding) is still in its stored dtype while the
    model computes in this one (model/dtype_convert.py), its output is cast to it: a lookup in the converted
    table would give the same values.

    Only the first block's hidden states are stored; the caller computes later ones block by block.
    chunk_size None runs all samples at once: cheap, since no block computes during the pass, and it
    guarantees every sample's arguments have the same form (see _merge_chunks).
    """
    chunk_size = chunk_size or input_ids.shape[0]
    records: list[list[tuple[tuple, dict]]] = [[] for _ in blocks]
    hidden_chunks: list[torch.Tensor] = []

    def make_recorder(idx: int) -> Callable:
        def recorder(*args, **kwargs):
            hidden, rest_args, rest_kwargs = _hidden_from(args, kwargs)
            if idx == 0:
                hidden_chunks.append(hidden.to(store_device))
            keep = lambda t: t.to(store_device)  # noqa: E731
            records[idx].append((_map_tensors(rest_args, keep), _map_tensors(rest_kwargs, keep)))
            if idx == len(blocks) - 1:
                raise _StopForward
            return hidden

        return recorder

    own_forwards = [b.__dict__.get("forward") for b in blocks]  # e.g. accelerate hooks
    for i, block in enumerate(blocks):
        block.forward = make_recorder(i)
    sizes = []
    cast = _cast_embedding_output(model, embedding_dtype)
    try:
        for start in range(0, input_ids.shape[0], chunk_size):
            ids = input_ids[start : start + chunk_size].to(device)
            mask = attention_mask[start : start + chunk_size].to(device)
            sizes.append(ids.shape[0])
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            except _StopForward:
                pass
    finally:
        if cast is not None:
            cast.remove()
        for block, own in zip(blocks, own_forwards):
            if own is None:
                del block.forward  # the class forward is back
            else:
                block.forward = own
    if len(hidden_chunks) != len(sizes) or any(len(r) != len(sizes) for r in records):
        raise RuntimeError("the model did not call every block once per batch; cannot capture block inputs")
    _evict_input_embedding(model)
    concat_cache: dict = {}
    calls = [_merge_chunks(r, sizes, concat_cache) for r in records]
    return CapturedInputs(hidden_states=torch.cat(hidden_chunks, dim=0), calls=calls)


def _cast_embedding_output(model: nn.Module, dtype: Optional[torch.dtype]):
    """A forward hook casting the token embedding's output to `dtype` (None when nothing needs a cast)."""
    embedding = input_embedding(model)
    if dtype is None or type(embedding) is not nn.Embedding or embedding.weight.dtype == dtype:
        return None
    return embedding.register_forward_hook(lambda module, args, out: out.to(dtype))


def _evict_input_embedding(model: nn.Module) -> None:
    """Hand back the token embedding's memory-mapped file pages once the capture pass has read them.

    A lookup of a few thousand scattered rows maps nearly the whole table in (the kernel maps the cached
    pages around each faulting one), and nothing reads it again during the block walk: on SmolLM2 that is
    125 MiB of the walk's RSS. Only clean file pages go (model/memory.py), so the values stay readable.
    """
    weight = getattr(input_embedding(model), "weight", None)
    if isinstance(weight, torch.Tensor):
        evict_clean_file_pages(weight.detach())


def block_output(out: Any) -> torch.Tensor:
    """Hidden states from whatever a block returns (tensor, tuple or ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "to_tuple"):
        return out.to_tuple()[0]
    raise TypeError(f"cannot find hidden states in a block output of type {type(out).__name__}")
