"""What a checkpoint folder says about its model without building it: its config (transformers' class where it
knows the model type, else config.json as it is) and, where transformers has a class, that class's layout on
the meta device (tensor order, module kinds). Used by model-free RTN (model/checkpoint_skeleton.py).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

logger = logging.getLogger("auto_round")


class ModelFreeError(ValueError):
    """A model-free run cannot be made from this checkpoint or with these settings."""


def natural_key(name: str) -> list:
    """Sort key that puts layers.2 before layers.10 (module order = execution order of the blocks)."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


class KnownLayout:
    """What transformers' own class for the config says, where it has one: the state-dict order of its
    tensors (so shards split where the regular export's do) and the kind of each module (so a 2-D weight that
    is not a Linear layer is not taken for one). Built on the meta device: no memory, no weights."""

    def __init__(self, model: nn.Module):
        self.order = {name: i for i, name in enumerate(model.state_dict(keep_vars=True))}
        self.kinds: dict[str, str] = {}
        conv1d = _conv1d_type()
        for name, module in model.named_modules():
            self.kinds[name] = ("conv1d" if conv1d is not None and isinstance(module, conv1d) else
                                "linear" if isinstance(module, nn.Linear) else
                                "embedding" if isinstance(module, nn.Embedding) else "other")

    def sort_key(self, name: str) -> tuple:
        return (self.order.get(name, len(self.order)), natural_key(name))


def _conv1d_type() -> Optional[type]:
    try:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    except ImportError:
        return None


def known_layout(config: Any, trust_remote_code: bool = True) -> Optional[KnownLayout]:
    """The KnownLayout of the config's transformers class on the meta device; None where transformers has no
    class for it (the names alone decide then)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(copy.deepcopy(config), trust_remote_code=trust_remote_code)
    except Exception as err:  # unknown model type, remote code that fails: the model-free case it is for
        logger.info("model_free: no transformers class for this config (%s); layers from the names alone",
                    str(err).splitlines()[0][:160] if str(err) else type(err).__name__)
        return None
    return KnownLayout(model)


def warn_unknown_to_transformers(root: nn.Module, layout: KnownLayout) -> list[str]:
    """Warn about the Linear layers of the checkpoint that transformers' class holds under no such name (MoE
    experts it fuses into 3-D parameters, tensors it renames): quantized under the checkpoint's names they are
    what vLLM reads, but transformers cannot load them. Returns their names."""
    unknown = [n for n, m in root.named_modules() if isinstance(m, nn.Linear) and n not in layout.kinds]
    if unknown:
        logger.warning("model_free: %d Linear layers of the checkpoint are not modules of transformers' class for "
                       "this model (e.g. %s: experts it fuses, or names it changes); they are quantized under the "
                       "checkpoint's names, which vLLM reads, but transformers cannot load such an export",
                       len(unknown), ", ".join(unknown[:3]))
    return unknown


def ties_embeddings(config: Any) -> bool:
    """Whether the config ties lm_head to the embedding; for a config transformers does not know, only an
    explicit `tie_word_embeddings: true` counts (PretrainedConfig's default True is no model's word)."""
    if isinstance(config, raw_config_class()):
        return any(bool(d.get("tie_word_embeddings", False)) for d in (config.raw, config.raw.get("text_config") or {}))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", False))


@functools.cache
def raw_config_class() -> type:
    """RawConfig, made on first use (transformers is imported only by the loaders)."""
    from transformers import PretrainedConfig

    class RawConfig(PretrainedConfig):
        """config.json of a model type transformers does not know, written back as it was read, with what an
        export sets (quantization_config, dtype): a round trip through PretrainedConfig would drop its
        model_type and the keys equal to PretrainedConfig's defaults, which need not be the model's."""

        def __init__(self, raw: Optional[dict] = None, **kwargs):
            raw = dict(raw or kwargs)
            super().__init__(**{k: v for k, v in raw.items() if k not in ("model_type",)})
            self.raw = raw

        def to_dict(self) -> dict:
            out = copy.deepcopy(self.raw)
            qconfig = getattr(self, "quantization_config", None)
            if qconfig is not None:
                out["quantization_config"] = qconfig.to_dict() if hasattr(qconfig, "to_dict") else qconfig
            else:
                out.pop("quantization_config", None)
            dtype = getattr(self, "dtype", None)
            if dtype is not None:
                name = str(dtype).replace("torch.", "")
                out["dtype"] = name
                if "torch_dtype" in out:
                    out["torch_dtype"] = name
            return out

        def to_diff_dict(self) -> dict:
            return self.to_dict()

    return RawConfig




def load_config(folder: "str | Path", trust_remote_code: bool = True) -> tuple[Any, Any]:
    """(config, generation_config) of a checkpoint folder: transformers' classes where it knows the model type
    (their defaults fill what config.json leaves out), else a plain PretrainedConfig of the file's values."""
    from transformers import AutoConfig, GenerationConfig

    folder = Path(folder)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError, ImportError) as err:
        logger.warning("model_free: transformers does not know this config (%s); using config.json as it is",
                       str(err).splitlines()[0][:160])
        config = raw_config_class()(json.loads((folder / "config.json").read_text()))
    generation = None
    if (folder / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(folder)
    return config, generation
