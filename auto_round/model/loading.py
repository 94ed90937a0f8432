"""Load a causal LM and its tokenizer from a local directory or a Hugging Face hub id."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Optional

import torch

from .dtype_convert import PendingConversion, keeps_fp32_modules, stored_float_dtype
from .memory import evict_clean_file_pages, slices_handed_back
from .safetensors_header import checkpoint_tensors

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
    allow_pickle: bool = False,
) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) from a local directory or a hub id, every tensor in its final dtype (see
    load_model_deferred)."""
    model, tokenizer, pending = load_model_deferred(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                    device=device, allow_pickle=allow_pickle)
    if pending is not None:
        pending.convert()
    return model, tokenizer


def load_model_deferred(
    name_or_path: str,
    *,
    dtype: "str | torch.dtype | None" = None,
    trust_remote_code: bool = True,
    device: str = "cpu",
    allow_pickle: bool = False,
    num_hidden_layers: Optional[int] = None,
) -> tuple[torch.nn.Module, Any, Optional[PendingConversion]]:
    """(model, tokenizer, pending): with `pending` not None the model is still in its stored dtype and
    `pending.convert(...)` turns it into `dtype` module by module (model/dtype_convert.py).

    num_hidden_layers: load only the first N blocks (a debugging run on a big checkpoint; the reference's
    --num_hidden_layers): the config is cut to N layers, per-layer lists included, the other blocks' weights unread.

    dtype None means fp32 on CPU (bf16 matmuls are ~5x slower than fp32 on CPUs without AMX) and the
    checkpoint's own dtype elsewhere. A local folder whose weights are only pickle files (pytorch_model.bin,
    *.pt) is refused unless `allow_pickle` (unpickling runs code from the file).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name_or_path).expanduser()
    is_local = path.exists()
    if not is_local and not _HUB_ID.match(str(name_or_path)):
        raise ModelLoadError(f"model path {name_or_path!r} does not exist (and is not a hub id like 'org/name')")
    if is_local and not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json; pass a Hugging Face model directory")
    if is_local and not allow_pickle:
        refuse_pickle_only(path)
    if is_local:
        checkpoint_tensors(path)  # malformed / truncated safetensors headers: a clear error before transformers
    torch_dtype = parse_dtype(dtype) or (torch.float32 if device == "cpu" else "auto")
    source = str(path) if is_local else name_or_path
    # another dtype than the stored one: load as stored (memory-mapped), convert tensor by tensor (dtype_convert)
    stored = stored_float_dtype(path) if is_local and isinstance(torch_dtype, torch.dtype) else None
    convert = stored is not None and stored != torch_dtype
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        extra = {} if num_hidden_layers is None else \
            {"config": truncated_config(source, num_hidden_layers, trust_remote_code)}
        model = AutoModelForCausalLM.from_pretrained(source, dtype=stored if convert else torch_dtype,
                                                     trust_remote_code=trust_remote_code, **extra)
        if convert and keeps_fp32_modules(model):  # transformers' own rule decides which modules stay fp32
            del model
            convert = False
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                                         **extra)
    except OSError as err:
        where = "local directory" if is_local else "Hugging Face hub (is it reachable? pass a local directory otherwise)"
        raise ModelLoadError(f"could not load {name_or_path!r} from the {where}: {err}") from err
    except ValueError as err:
        raise ModelLoadError(_explain_value_error(name_or_path, err)) from err
    model.eval()
    check_finite(model)
    shown = torch_dtype if convert else model.dtype
    logger.info("loaded %s (%s, %.1f M parameters)", source, shown, sum(p.numel() for p in model.parameters()) / 1e6)
    return model, tokenizer, PendingConversion(model, torch_dtype) if convert else None


def load_model_free(
    name_or_path: str,
    *,
    dtype: "str | torch.dtype | None" = None,
    trust_remote_code: bool = True,
    device: str = "cpu",
) -> tuple[torch.nn.Module, Any, Any]:
    """(skeleton, tokenizer, pending) for model-free RTN (model/checkpoint_skeleton.py): the module tree of the
    checkpoint's tensor names on the meta device, and a PendingLoad that reads each module's tensors when asked,
    in the dtype load_model_deferred would give them (dtype None: fp32 on CPU, the checkpoint's own elsewhere)."""
    from transformers import AutoTokenizer

    from .fp8_source import fp8_block_size
    from .checkpoint_config import ModelFreeError, known_layout, load_config, warn_unknown_to_transformers
    from .checkpoint_skeleton import PendingLoad, build_skeleton
    from .source_dtypes import read_source_dtypes

    path = Path(name_or_path).expanduser()
    if not path.exists():
        if not _HUB_ID.match(str(name_or_path)):
            raise ModelLoadError(f"model path {name_or_path!r} does not exist (and is not a hub id like 'org/name')")
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors", "*.model",
                                                                          "*.txt", "*.jinja", "*.tiktoken"]))
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json; pass a Hugging Face model directory")
    config, generation = load_config(path, trust_remote_code)
    source_qc = getattr(config, "quantization_config", None)
    fp8_block = fp8_block_size(source_qc) if source_qc else None
    if source_qc and fp8_block is None:
        method = source_qc.get("quant_method", "?") if isinstance(source_qc, dict) else type(source_qc).__name__
        raise ModelFreeError(f"{path} is already quantized ({method}); model_free quantizes float checkpoints and "
                             "FP8 block-quantized ones (quant_method 'fp8' with weight_block_size)")
    if fp8_block is not None:
        del config.quantization_config  # the source's: the export writes its own
        logger.info("model_free: FP8 source with %dx%d blocks: its weights are dequantized as they are read", *fp8_block)
    layout = known_layout(config, trust_remote_code)
    skeleton = build_skeleton(path, config, generation, layout, fp8_block)
    if layout is not None:
        warn_unknown_to_transformers(skeleton, layout)
    wanted = parse_dtype(dtype)
    if wanted is None:
        source = read_source_dtypes(path)
        wanted = torch.float32 if device == "cpu" or source is None else source.config_dtype
    config.dtype = wanted  # as from_pretrained(dtype=wanted) leaves it
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load the tokenizer of {path}: {err}") from err
    n_params = sum(p.numel() for p in skeleton.parameters())
    logger.info("model_free: %s read from its tensor names (%.1f M parameters, loaded block by block as %s)",
                path, n_params / 1e6, wanted)
    return skeleton, tokenizer, PendingLoad(skeleton, path, wanted, fp8_block)


def truncated_config(source: str, n_layers: int, trust_remote_code: bool = True):
    """The model's config cut to its first `n_layers` blocks: num_hidden_layers and every per-layer list
    (layer_types, no_rope_layers, ...) of the text config. ModelLoadError when n_layers is not in [1, layers]."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    text = getattr(config, "text_config", None) or config
    total = getattr(text, "num_hidden_layers", None)
    if total is None:
        raise ModelLoadError(f"num_hidden_layers: the config of {source} has no num_hidden_layers to cut")
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or not 1 <= n_layers <= total:
        raise ModelLoadError(f"num_hidden_layers must be an integer in [1, {total}] for {source}, got {n_layers!r}")
    for key, value in list(vars(text).items()):
        if isinstance(value, (list, tuple)) and len(value) == total and key != "architectures":
            setattr(text, key, type(value)(value[:n_layers]))
    text.num_hidden_layers = n_layers
    logger.warning("debug: loading only the first %d of the %d layers of %s: the result is not the full model",
                   n_layers, total, source)
    return config


PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def pickle_only_files(path: Path) -> list[str]:
    """Names of a folder's pickle weight files when it has no safetensors / gguf weights, else []."""
    if any(path.glob("*.safetensors")) or any(path.glob("*.gguf")):
        return []
    return sorted(p.name for ext in PICKLE_PATTERNS for p in path.glob(ext))


def refuse_pickle_only(path: Path, error: type[ValueError] = ModelLoadError) -> None:
    """Raise `error` if the folder's weights are only pickle files (unpickling runs code from the file)."""
    pickles = pickle_only_files(path)
    if pickles:
        raise error(f"{path} holds its weights only as pickle files ({', '.join(pickles[:3])}); loading them "
                    "can run code from the file. Convert the checkpoint to safetensors, or pass "
                    "allow_pickle=True (CLI: --allow_pickle_checkpoint) if you trust it")


def _explain_value_error(name: str, err: ValueError) -> str:
    text = str(err)
    if "trust_remote_code" in text:
        return (f"{name!r} needs its own modeling code (trust_remote_code); drop --disable_trust_remote_code "
                "(trust_remote_code=True) if you trust that code")
    if "Unrecognized configuration class" in text or "AutoModelForCausalLM" in text:
        return (f"{name!r} is not a causal language model (transformers has no AutoModelForCausalLM class for "
                f"it); auto-round quantizes decoder-only LMs. ({text.splitlines()[0][:200]})")
    return f"could not load {name!r}: {text}"


FINITE_CHECK_CHUNK = 1 << 20  # elements per slice of the NaN/Inf scan (4 MiB of fp32)


def check_finite(model: torch.nn.Module, limit: int = 3) -> None:
    """Raise ModelLoadError naming the tensors (up to `limit`) that hold NaN or Inf.

    Reading every weight would make the whole memory-mapped checkpoint resident (on SmolLM2: +500 MiB of RSS
    before any block is tuned); each tensor's unmodified file pages are handed back once it is checked, so
    blocks are paged in only when they are quantized (model/memory.py). The scan goes slice by slice: a
    whole-tensor `isfinite` allocates temporaries of the tensor's size (|x| and two masks) on top of its
    paged-in bytes, which on SmolLM2's 113 MB embedding raised the peak RSS of loading from 420 to 720 MiB."""
    bad = []
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and tensor.device.type != "meta":
            if not all_finite(tensor):
                bad.append(name)
                if len(bad) >= limit:
                    break
            evict_clean_file_pages(tensor)  # also the pages that straddle two slices
    if bad:
        raise ModelLoadError(f"the model's weights hold NaN or Inf values in {', '.join(bad)}; quantizing them would "
                             "give a broken checkpoint: fix or re-download the model")


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or Inf; a contiguous tensor is read `FINITE_CHECK_CHUNK` elements at a
    time and each slice's clean file pages are handed back as soon as it is read."""
    if not tensor.is_contiguous() or tensor.numel() <= FINITE_CHECK_CHUNK:
        return bool(torch.isfinite(tensor).all())
    return all(bool(torch.isfinite(piece).all()) for _, piece in slices_handed_back(tensor, FINITE_CHECK_CHUNK))
