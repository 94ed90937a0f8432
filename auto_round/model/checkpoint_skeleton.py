"""Model-free loading: a module tree rebuilt from a checkpoint's tensor names, weights read block by block.

Plain RTN needs no forward pass, so it needs no modeling code: the layers to quantize, their shapes and the
blocks they sit in can be read from the safetensors headers alone (the reference's `--model_free`). That
makes RTN independent of transformers' support for the architecture (a model newer than the installed
transformers, remote code that breaks with it) and skips building the model.

`build_skeleton` turns every tensor name into a module path on the meta device:

    model.layers.3.self_attn.q_proj.weight [out, in]  ->  ModuleList `model.layers`, nn.Linear `...q_proj`
    model.embed_tokens.weight [vocab, hidden]         ->  nn.Embedding (a name with embed / wte / wpe)
    model.layers.3.input_layernorm.weight [hidden]    ->  a plain Parameter holder

so block discovery, layer_config / fp_layers matching, the shape rules and every exporter work on it as on a
transformers model, and the export keeps the checkpoint's own tensor names (what vLLM reads). `PendingLoad`
reads a module's tensors from the files when the walk reaches it, in the dtype the regular load would give
them, so the result equals the regular RTN path's (tested byte for byte).

What names cannot say, transformers' class for the config says where it has one
(`checkpoint_config.known_layout`, built on the meta device): the tensor order of the regular export and which modules are Linear layers; Conv1D layers
(GPT-2 style, [in, out] weights) are refused. Without such a class every 2-D float `.weight` that is not an
embedding is taken for a Linear layer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from .dtype_convert import SAFETENSORS_FLOAT, converted_tensor
from .checkpoint_config import KnownLayout, ModelFreeError, natural_key, ties_embeddings
from .fp8_source import dequantize_fp8_blocks, fp8_pairs, logical_entries
from .memory import evict_clean_file_pages
from .safetensors_header import TensorEntry, checkpoint_tensors

logger = logging.getLogger("auto_round")

# model types whose checkpoints hold transformers' Conv1D ([in, out]) weights: the names cannot tell them apart
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
_EMBEDDING_WORDS = ("embed", "wte", "wpe")
_HEAD_NAMES = ("lm_head", "embed_out", "output")
_ROUTER_NAMES = ("gate", "router", "shared_expert_gate")
_TOKEN_EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings", "embeddings")
_STORED_DTYPES = {**SAFETENSORS_FLOAT, "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                  "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                  "F8_E5M2": torch.float8_e5m2}


class CheckpointSkeleton(nn.Module):
    """The module tree of a checkpoint's tensor names (meta tensors until loaded); `config` and
    `generation_config` are the checkpoint's, for the exporters."""

    def __init__(self, config: Any, generation_config: Any = None):
        super().__init__()
        self.config = config
        self.generation_config = generation_config

    def get_input_embeddings(self) -> Optional[nn.Module]:
        """The token embedding: an Embedding outside the blocks, a token-embedding name first (OPT also has
        embed_positions, GPT-2 style models wpe)."""
        found = [(n, m) for n, m in self.named_modules() if isinstance(m, nn.Embedding) and not _numbered(n)]
        tokens = [m for n, m in found if n.rpartition(".")[2] in _TOKEN_EMBEDDING_NAMES]
        return (tokens or [m for _, m in found] or [None])[0]

    def get_output_embeddings(self) -> Optional[nn.Module]:
        for name in _HEAD_NAMES:
            module = getattr(self, name, None)
            if isinstance(module, nn.Linear):
                return module
        return None


def _numbered(name: str) -> bool:
    return any(part.isdigit() for part in name.split("."))


def _slot(parent: nn.ModuleList, index: int) -> nn.Module:
    """parent[index], the list grown with placeholder modules up to it (indices may arrive in any order)."""
    while len(parent) <= index:
        parent.append(nn.Module())
    return parent[index]


def _child(parent: nn.Module, part: str, next_part: Optional[str]) -> nn.Module:
    """parent's child `part`, created as a ModuleList when the name goes on with an index, else a Module."""
    if part in parent._modules:
        return parent._modules[part]
    if isinstance(parent, nn.ModuleList):
        child = _slot(parent, int(part))
        if next_part is not None and next_part.isdigit() and not isinstance(child, nn.ModuleList):
            parent[int(part)] = child = nn.ModuleList()
        return child
    child = nn.ModuleList() if next_part is not None and next_part.isdigit() else nn.Module()
    parent.add_module(part, child)
    return child


def _leaf(entries: dict[str, TensorEntry], name: str, kind: Optional[str] = None, moe: bool = False) -> nn.Module:
    """The module holding tensors `name.*`: Linear / Embedding for a 2-D float weight, else a Parameter holder.
    `kind` (KnownLayout's) decides where given; the name's words otherwise, where an MoE router (`gate`,
    `router`, `shared_expert_gate` in a checkpoint with experts) is no Linear layer: routers stay in floating
    point, as transformers 5 (its TopKRouter modules), the reference and vLLM (an unquantized router) keep them."""
    weight, bias = entries.get(f"{name}.weight"), entries.get(f"{name}.bias")
    is_float_2d = weight is not None and weight.dtype in SAFETENSORS_FLOAT and len(weight.shape) == 2
    if kind == "conv1d":
        raise ModelFreeError(f"model_free: {name} is a Conv1D layer ([in, out] weight); quantize this model without "
                             "model_free")
    last = name.rpartition(".")[2].lower()
    embedding = (kind == "embedding") if kind is not None else \
        (name not in _HEAD_NAMES and any(w in last for w in _EMBEDDING_WORDS))
    if kind not in (None, "linear", "embedding") or (kind is None and moe and last in _ROUTER_NAMES):
        is_float_2d = False
    with torch.device("meta"):
        if is_float_2d and embedding:
            return nn.Embedding(*weight.shape, dtype=SAFETENSORS_FLOAT[weight.dtype])
        if is_float_2d:
            has_bias = bias is not None and tuple(bias.shape) == (weight.shape[0],)
            return nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, dtype=SAFETENSORS_FLOAT[weight.dtype])
    return nn.Module()


def build_skeleton(folder: "str | Path", config: Any, generation_config: Any = None,
                   layout: Optional[KnownLayout] = None, fp8_block: Optional[tuple[int, int]] = None
                   ) -> CheckpointSkeleton:
    """The CheckpointSkeleton of a local safetensors checkpoint (see the module docstring); ModelFreeError for
    a folder without safetensors weights or a Conv1D model type. `layout` (known_layout) orders the tensors and
    types the modules transformers' class has under the same names. `fp8_block`: an FP8 block-quantized source
    (model/fp8_source.py), whose fp8 weights stand as float weights of the config's dtype."""
    folder = Path(folder)
    model_type = str(getattr(config, "model_type", "") or "")
    if model_type in CONV1D_MODEL_TYPES:
        raise ModelFreeError(f"model_free: {model_type} stores its layers as Conv1D ([in, out]), which tensor names "
                             "cannot tell from Linear ones; quantize it without model_free")
    entries = checkpoint_tensors(folder)
    if not entries:
        raise ModelFreeError(f"model_free reads safetensors weights; {folder} has none")
    if fp8_block is not None:
        entries = logical_entries(entries, fp8_pairs(entries), _dequantized_dtype_name(config))
    root = CheckpointSkeleton(config, generation_config)
    modules: dict[str, nn.Module] = {"": root}
    kinds = layout.kinds if layout is not None else {}
    moe = any(".experts." in name for name in entries)
    for full_name in sorted(entries, key=layout.sort_key if layout is not None else natural_key):
        module_name, _, tensor_name = full_name.rpartition(".")
        parent = _module_at(root, modules, module_name, entries, kinds, moe)
        if tensor_name in parent._parameters and parent._parameters[tensor_name] is not None:
            continue  # made with its Linear / Embedding
        entry = entries[full_name]
        if entry.dtype not in _STORED_DTYPES:
            raise ModelFreeError(f"model_free: tensor {full_name} is stored as {entry.dtype}; an already quantized "
                                 "checkpoint cannot be quantized model-free")
        tensor = torch.empty(tuple(entry.shape), dtype=_STORED_DTYPES[entry.dtype], device="meta")
        parent.register_parameter(tensor_name, nn.Parameter(tensor, requires_grad=False))
    _tie_head(root, config)
    return root


def _dequantized_dtype_name(config: Any) -> str:
    """The safetensors dtype name fp8 source weights stand as: the config's declared float dtype, else BF16."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""), None)
    return names.get(dtype, "BF16")


def _module_at(root: nn.Module, modules: dict[str, nn.Module], name: str, entries: dict[str, TensorEntry],
               kinds: dict[str, str], moe: bool = False) -> nn.Module:
    """The module at dotted `name`, created (with its ancestors) on first use."""
    if name in modules:
        return modules[name]
    parts = name.split(".")
    parent = root
    for i, part in enumerate(parts):
        prefix = ".".join(parts[: i + 1])
        if prefix in modules:
            parent = modules[prefix]
            continue
        if isinstance(parent, nn.ModuleList) and not part.isdigit():
            raise ModelFreeError(f"model_free: {prefix} mixes numbered and named entries under "
                                 f"{prefix.rpartition('.')[0]}; this checkpoint's layout cannot be read from its names")
        if i == len(parts) - 1:
            leaf = _leaf(entries, prefix, kinds.get(prefix), moe)
            if isinstance(parent, nn.ModuleList):
                _slot(parent, int(part))
                parent[int(part)] = leaf
            else:
                parent.add_module(part, leaf)
            parent = leaf
        else:
            parent = _child(parent, part, parts[i + 1])
        modules[prefix] = parent
    return parent


def _tie_head(root: CheckpointSkeleton, config: Any) -> None:
    """A config that ties lm_head to the token embedding: the skeleton's head is a Linear holding the embedding's
    own weight, as transformers builds it (checkpoints usually do not store it; one that does has it replaced),
    so the GGUF plan sees the tie and an export writes the embedding only."""
    embedding = root.get_input_embeddings()
    if embedding is None or not ties_embeddings(config):
        return
    head = root.get_output_embeddings()
    if head is not None and tuple(head.weight.shape) != tuple(embedding.weight.shape):
        return
    name = next((n for n in _HEAD_NAMES if head is not None and getattr(root, n, None) is head), "lm_head")
    if head is not None:
        logger.info("model_free: %s.weight is stored but tied to the embedding by the config; it is not written", name)
    vocab, hidden = embedding.weight.shape
    with torch.device("meta"):
        tied = nn.Linear(hidden, vocab, bias=False, dtype=embedding.weight.dtype)
    tied.weight = embedding.weight
    setattr(root, name, tied)


class PendingLoad:
    """Reads a CheckpointSkeleton's tensors from the files when asked, with PendingConversion's interface:
    `convert(prefix)` before a module is used, `convert(skip=...)` for all but some modules, `convert()` for
    the rest. Float tensors come in `wanted` (what from_pretrained(dtype=wanted) gives; None = as stored); a
    NaN or Inf is a ModelFreeError naming the tensor. Tied parameters stay tied."""

    def __init__(self, root: CheckpointSkeleton, folder: "str | Path", wanted: Optional[torch.dtype],
                 fp8_block: Optional[tuple[int, int]] = None):
        self.root, self.folder, self.wanted = root, Path(folder), wanted
        self.entries = checkpoint_tensors(self.folder)
        # an FP8 block-quantized source: its fp8 weights are dequantized with their scales when read
        self.fp8_block = fp8_block
        self.fp8_scales = fp8_pairs(self.entries) if fp8_block is not None else {}
        self._owners: dict[int, list[tuple[nn.Module, str, str]]] = {}  # id(meta param) -> (module, attr, name)
        for module_name, module in root.named_modules(remove_duplicate=False):
            for attr, param in module._parameters.items():
                if param is not None and param.is_meta:
                    full = f"{module_name}.{attr}" if module_name else attr
                    self._owners.setdefault(id(param), []).append((module, attr, full))
        self._data_start: dict[str, int] = {}  # file -> offset of its data region (8 + header length)

    def _mapped(self, name: str) -> torch.Tensor:
        """The stored tensor as a copy-on-write memory map of its bytes (nothing is read until used; its clean
        pages can be handed back, model/memory.py), as transformers' own zero-copy load gives it."""
        entry = self.entries[name]
        dtype = _STORED_DTYPES[entry.dtype]
        if entry.end == entry.begin:
            return torch.empty(tuple(entry.shape), dtype=dtype)
        start = self._data_start.get(entry.file)
        if start is None:
            with open(self.folder / entry.file, "rb") as f:
                start = self._data_start[entry.file] = 8 + int.from_bytes(f.read(8), "little")
        raw = np.memmap(self.folder / entry.file, dtype=np.uint8, mode="c", offset=start + entry.begin,
                        shape=(entry.end - entry.begin,))
        return torch.from_numpy(raw).view(dtype).reshape(tuple(entry.shape))

    def _read(self, name: str) -> torch.Tensor:
        from .loading import all_finite

        tensor = self._mapped(name)
        if name in self.fp8_scales:
            try:
                tensor = dequantize_fp8_blocks(tensor, self._mapped(self.fp8_scales[name]), self.fp8_block)
            except ValueError as err:
                raise ModelFreeError(f"{name}: {err}") from err
        if tensor.is_floating_point():
            if not all_finite(tensor):
                raise ModelFreeError(f"the checkpoint's tensor {name} holds NaN or Inf values; quantizing it would "
                                     "give a broken checkpoint: fix or re-download the model")
            if self.wanted is not None and tensor.dtype != self.wanted:
                tensor = converted_tensor(tensor, self.wanted)  # slice by slice, the file pages handed back
            else:
                evict_clean_file_pages(tensor)  # read again from the page cache when used
        return tensor

    @torch.no_grad()
    def convert(self, prefix: str = "", *, skip: tuple[str, ...] = ()) -> int:
        """Load the tensors of module `prefix` ("" = everything) not under the modules `skip`; returns how many."""
        root = self.root.get_submodule(prefix) if prefix else self.root
        skipped = {id(p) for name in skip for p in self.root.get_submodule(name).parameters()}
        loaded = 0
        for param in list(root.parameters()):
            owners = self._owners.pop(id(param), None) if param.is_meta and id(param) not in skipped else None
            if not owners:
                continue
            new = nn.Parameter(self._read(owners[0][2]), requires_grad=False)
            for module, attr, _ in owners:  # every module holding it: ties stay ties
                module._parameters[attr] = new
            loaded += 1
        return loaded
