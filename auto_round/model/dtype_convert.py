"""Load a checkpoint in a dtype other than the one it is stored in without holding both copies at once.

Asked for fp32 weights from a bf16 checkpoint (the CPU default: most hub checkpoints are bf16), transformers
converts each tensor while loading, and the file pages it reads stay resident until the load ends: the
load peaks at the converted model plus the whole file (bf16 SmolLM2 -> fp32: ~1110 MiB, far above the tuning's
own peak). Here the checkpoint is loaded in its own dtype (a zero-copy memory map: nothing is read), then
each tensor is converted alone and its file pages are handed back at once (model/memory.py), so the load
peaks at the converted model plus one tensor.

The dtypes each parameter and buffer must end up in are those `from_pretrained(dtype=...)` gives: they are
read from the same model class instantiated on the meta device under that dtype (rotary `inv_freq` stays
fp32, buffers made with the default dtype follow it). Models that keep modules in fp32 on purpose
(`_keep_in_fp32_modules`) are left to transformers.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .blocks import input_embedding, input_embedding_name
from .memory import evict_clean_file_pages, slices_handed_back
from .safetensors_header import checkpoint_tensors

SAFETENSORS_FLOAT = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def stored_float_dtype(folder: "str | Path") -> Optional[torch.dtype]:
    """The one floating dtype of a local safetensors checkpoint's tensors; None if mixed, other or none."""
    dtypes = {e.dtype for e in checkpoint_tensors(folder).values() if not e.is_integer and e.dtype != "BOOL"}
    return SAFETENSORS_FLOAT.get(dtypes.pop()) if len(dtypes) == 1 else None


def keeps_fp32_modules(model: nn.Module) -> bool:
    """Whether the model class keeps some modules in fp32 whatever the dtype (a rule of transformers' loader)."""
    cls = type(model)
    return bool(getattr(cls, "_keep_in_fp32_modules", None) or getattr(cls, "_keep_in_fp32_modules_strict", None))


def target_dtypes(model: nn.Module, wanted: torch.dtype) -> dict[str, torch.dtype]:
    """name -> dtype of every parameter and buffer of `model`'s class built on the meta device in `wanted`."""
    config = copy.deepcopy(model.config)  # _from_config may write its dtype into the config it is given
    with torch.device("meta"):
        skeleton = type(model)._from_config(config, dtype=wanted)
    return {**{n: p.dtype for n, p in skeleton.named_parameters(remove_duplicate=False)},
            **{n: b.dtype for n, b in skeleton.named_buffers(remove_duplicate=False)}}


SLICE_ELEMENTS = 1 << 20  # elements converted at a time (4 MiB of fp32)


def converted_tensor(old: torch.Tensor, target: torch.dtype) -> torch.Tensor:
    """`old` in `target`, converted slice by slice with each slice's file pages handed back as soon as it is
    read: a 113 MB embedding then adds 4 MiB of source pages to the peak, not all of them."""
    if not old.is_contiguous() or old.numel() <= SLICE_ELEMENTS:
        new = old.to(target)
        evict_clean_file_pages(old)
        return new
    new = torch.empty(old.shape, dtype=target, device=old.device)
    dst = new.view(-1)
    for start, piece in slices_handed_back(old, SLICE_ELEMENTS):
        dst[start:start + piece.numel()].copy_(piece)
    return new


class PendingConversion:
    """A model loaded in its stored dtype whose tensors are converted to what from_pretrained(dtype=wanted)
    gives, module by module, when asked: `convert(prefix)` before a module computes, `convert()` for the rest.

    Converting a block only when the walk reaches it keeps the blocks not yet quantized memory-mapped in their
    stored dtype (not resident) instead of as a converted copy on the heap for the whole run."""

    def __init__(self, model: nn.Module, wanted: torch.dtype):
        self.model, self.wanted = model, wanted
        self.targets = target_dtypes(model, wanted)
        self._done: set[int] = set()
        self.config_dtype_set = False

    @torch.no_grad()
    def convert(self, prefix: str = "", *, skip: tuple[str, ...] = ()) -> int:
        """Convert the tensors of module `prefix` ("" = the whole model) except those under `skip` (module
        names); returns how many tensors were converted. Tied parameters stay tied."""
        root = self.model.get_submodule(prefix) if prefix else self.model
        base = prefix + "." if prefix else ""
        # skipped by identity: a tied weight (lm_head = embedding) waits with the module it is skipped under
        skipped = {id(t) for name in skip for t in [*self.model.get_submodule(name).parameters(),
                                                     *self.model.get_submodule(name).buffers()]}
        converted = 0
        for module_name, module in root.named_modules():
            full_module = base + module_name if module_name else prefix
            for kind in ("_parameters", "_buffers"):
                for name, tensor in getattr(module, kind).items():
                    target = self.targets.get(f"{full_module}.{name}" if full_module else name)
                    if tensor is None or id(tensor) in self._done or id(tensor) in skipped or target is None \
                            or tensor.dtype == target:
                        continue
                    self._done.add(id(tensor))
                    new = converted_tensor(tensor.detach(), target)
                    if kind == "_parameters":
                        tensor.data = new  # the Parameter object stays: ties (embedding / lm_head) hold
                    else:
                        module._buffers[name] = new
                    converted += 1
        if not self.config_dtype_set and hasattr(self.model.config, "dtype"):
            self.model.config.dtype = self.wanted
            self.config_dtype_set = True
        return converted


def convert_loaded_model(model: nn.Module, wanted: torch.dtype) -> int:
    """Convert a model loaded in its stored dtype to what from_pretrained(dtype=wanted) gives, tensor by tensor,
    handing each source tensor's file pages back. Returns the number of tensors converted."""
    return PendingConversion(model, wanted).convert()


def lazy_embedding_name(model: nn.Module) -> Optional[str]:
    """The token embedding's module name when it may wait in its stored dtype until the end of the walk: a
    plain nn.Embedding, whose lookups cast afterwards equal lookups in the converted table (Gemma's scaled
    embedding multiplies in the table's dtype, so it is converted at once)."""
    if type(input_embedding(model)) is not nn.Embedding:
        return None
    return input_embedding_name(model)

