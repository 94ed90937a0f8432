"""Load a causal LM and its tokenizer from a local directory or a Hugging Face hub id."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Optional

import torch

logger = logging.getLogger("auto_round")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelLoadError(ValueError):
    """The model could not be found or loaded."""


def parse_dtype(dtype: "str | torch.dtype | None") -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {
        "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
        "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
        "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    }
    key = str(dtype).lower().replace("torch.", "")
    if key not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16")
    return table[key]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model_and_tokenizer(
    name_or_path: str,
    *,
    dtype: "str | torch.dtype | None" = None,
    trust_remote_code: bool = True,
    device: str = "cpu",
) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) from a local directory or a hub id.

    dtype None means fp32 on CPU (bf16 matmuls are ~5x slower than fp32 on CPUs without AMX) and the
    checkpoint's own dtype elsewhere.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name_or_path).expanduser()
    is_local = path.exists()
    if not is_local and not _HUB_ID.match(str(name_or_path)):
        raise ModelLoadError(f"model path {name_or_path!r} does not exist (and is not a hub id like 'org/name')")
    if is_local and not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json; pass a Hugging Face model directory")
    torch_dtype = parse_dtype(dtype) or (torch.float32 if device == "cpu" else "auto")
    source = str(path) if is_local else name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except OSError as err:
        where = "local directory" if is_local else "Hugging Face hub (is it reachable? pass a local directory otherwise)"
        raise ModelLoadError(f"could not load {name_or_path!r} from the {where}: {err}") from err
    model.eval()
    logger.info("loaded %s (%s, %.1f M parameters)", source, model.dtype, sum(p.numel() for p in model.parameters()) / 1e6)
    return model, tokenizer
