"""`auto-round list format` (and `list scheme`): what this version can write, and what loads it."""

from __future__ import annotations

from ..export.gguf import SUPPORTED_ARCHS

FORMATS = [  # (format, weights it holds, what loads it)
    ("auto_round", "int 2-8 bits, sym/asym, any group size (ragged last group), mixed per layer",
     "transformers (plain from_pretrained), vLLM, SGLang"),
    ("auto_round:auto_gptq", "as auto_round, GPTQ v1 layout (zp - 1); the sym default", "as auto_round"),
    ("auto_round:auto_awq", "int 4 bits asym/sym, in_features % group == 0; the asym W4 default", "as auto_round"),
    ("auto_round:gptqmodel", "as auto_round, raw zero points and g_idx", "as auto_round"),
    ("auto_round:llm_compressor", "MXFP4/6/8, NVFP4 weights (compressed-tensors tensors), any activation scheme; "
     "chosen by auto_round for them", "transformers via our FloatQuantLinear (activation qdq included)"),
    ("auto_round:fp8_static", "FP8 weights per tensor / channel / group / 2-D block, any activation scheme; chosen "
     "by auto_round for them", "transformers via our FloatQuantLinear (activation qdq included)"),
    ("auto_gptq", "int 2/3/4/8 bits (asym with a warning), mixed per layer via `dynamic`, fp16 tensors",
     "GPTQModel, vLLM, TGI; transformers with quantization_config=AutoRoundConfig()"),
    ("auto_awq", "int 4 bits, one scheme for all layers, in_features % group == 0, fp16 tensors",
     "AutoAWQ, vLLM, SGLang; transformers with quantization_config=AutoRoundConfig()"),
    ("llm_compressor", "int 1-8 bits sym/asym (pack-quantized), INT8/int W8A8 (int-quantized), MXFP4/6/8, NVFP4, "
     "FP8 tensor/channel/group/block (float-quantized), with input_activations; nn.Linear, whole groups; mixed "
     "schemes as config groups", "vLLM, transformers (compressed-tensors integration; sym)"),
    ("fp8", "FP8_BLOCK (weight + weight_scale_inv, dynamic fp8 activations), whole column blocks",
     "transformers FineGrainedFP8 (GPU; CPU dequantizes), vLLM, SGLang"),
    ("fake", "any scheme, weights stored dequantized in float; with quantized activations an auto_round:fake "
     "config and the static ranges", "anything that loads the original model; with activations: transformers"),
    ("gguf:<mix>", "one .gguf file with llama.cpp's per-tensor ggml types for the mix (q2_k_s, q3_k_s/m/l, q4_k_s/m, "
     "q5_k_s/m, q6_k, q4_0, q4_1, q5_0, q5_1, q8_0, bf16, f16, f32), or per layer from an AutoScheme over gguf:* "
     "options; model types " + ", ".join(SUPPORTED_ARCHS),
     "llama.cpp, llama-cpp-python, Ollama, LM Studio; transformers (gguf_file=)"),
]
SCHEMES = [
    ("W2A16 .. W8A16", "int weights, group 128, sym (full range)"),
    ("W2A16G64 / W2A16G32, W4A16G64 ...", "the same with group 64 / 32"),
    ("gguf:q4_k_m, gguf:q2_k_s, ...", "llama.cpp k-quant / legacy block types per tensor (export with the same gguf:*)"),
]


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows)])


def listing(what: str) -> str:
    """Text of `auto-round list <what>`; ValueError for anything but format(s) / scheme(s)."""
    key = what.lower().rstrip("s")
    if key == "format":
        return _table(FORMATS, ("format", "holds", "loaded by"))
    if key == "scheme":
        return _table(SCHEMES, ("scheme", "meaning"))
    raise ValueError(f"auto-round list: unknown topic {what!r}; use 'format' or 'scheme'")
