"""The `fake` format: the fake-quantized model saved as a plain floating-point checkpoint.

No quantization_config is written, so any runtime loads it as an ordinary model; the weights already sit
on the quantization grid. Useful for research schemes and for checking accuracy without a kernel.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from .context import ExportContext
from .writer import save_generation_config, save_tokenizer, tied_parameter_names, write_safetensors

logger = logging.getLogger("auto_round")


def save_fake(ctx: ExportContext, directory: Path) -> dict:
    config = copy.deepcopy(ctx.model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(str(directory))
    tied = tied_parameter_names(ctx.model)
    state = {k: v for k, v in ctx.model.state_dict().items() if k not in tied}
    write_safetensors(state, directory, ctx.max_shard_size)
    save_generation_config(ctx.model, directory)
    save_tokenizer(ctx.tokenizer, directory)
    logger.info("wrote the fake-quantized checkpoint")
    return {}
