"""Our GGUF writer (llama.cpp's model file), on gguf-py's `GGUFWriter`.

    arch.py   per-architecture table: HF model_type -> llama.cpp arch, hyper-parameter keys, tensor names,
              tensor transforms (llama q/k row permutation, Gemma norm + 1, llama3 rope factors)
    vocab.py  tokenizer -> tokenizer.ggml.* (byte-level BPE "gpt2" with a pre-tokenizer name chosen from the
              tokenizer's own split regexes, or SentencePiece-style "llama")
    file.py   `write_gguf` (streams tensors through a temp file) and llama.cpp's file naming

Data-table driven instead of llama.cpp's convert_hf_to_gguf.py: an unknown architecture is refused before
quantization (`check_gguf_arch`), an unknown pre-tokenizer regex falls back with a warning.
"""

from .arch import SUPPORTED_ARCHS, check_gguf_arch, gguf_tensor_name
from .file import GGUFTensor, gguf_file_name, write_gguf
from .vocab import check_gguf_tokenizer, choose_pre_tokenizer

__all__ = ["GGUFTensor", "SUPPORTED_ARCHS", "check_gguf_arch", "check_gguf_tokenizer", "choose_pre_tokenizer",
           "gguf_file_name", "gguf_tensor_name", "write_gguf"]
