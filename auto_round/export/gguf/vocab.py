"""A transformers fast tokenizer -> GGUF tokenizer metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`).

Two kinds llama.cpp reads (src/llama-vocab.cpp):

    gpt2    byte-level BPE (GPT-2, SmolLM, Qwen2/3, Llama-3): tokens spelled in the GPT-2 byte alphabet,
            merges "a b" in rank order, and `tokenizer.ggml.pre`, a *name* llama.cpp maps to its own
            split regexes. We choose the name by reading the tokenizer's pre-tokenizer (its Split regexes,
            Digits and ByteLevel steps) and matching it against the table below; an unknown one gets the
            closest entry (or "default") with a warning instead of failing.
    llama   SentencePiece-style (Llama-2, Mistral, Gemma: BPE with byte fallback, or Unigram): tokens with
            U+2581 for spaces, one score per token (llama.cpp merges the adjacent pair whose merged token
            scores highest, so BPE tokens score -merge rank) and <0xXX> byte-fallback tokens.

Token types follow llama.cpp's converter: added special tokens (and `<|...|>`-looking ones) CONTROL,
other added tokens USER_DEFINED, <0xXX> BYTE (llama kind), the unk token UNKNOWN (llama kind), ids past the
tokenizer's vocabulary "[PAD<i>]" UNUSED, the rest NORMAL.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from typing import Any, Optional

import gguf

from ..writer import ExportError

logger = logging.getLogger("auto_round")

# Split regexes as they appear in the models' tokenizer.json (HF spelling, before llama.cpp's rewrites).
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_TAIL = r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|" + _TAIL
QWEN2_SPLIT = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|" + _TAIL
QWEN35_SPLIT = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SEED_CODER_SPLIT = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+"
                    r"|\s+(?!\S)|\s+")
MINICPM5_SPLIT = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+|" + _TAIL
_CASED = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
_UPPER = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
TEKKEN_SPLIT = _CASED + "|" + _UPPER + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
GPT4O_SPLIT = (_CASED + _CONTRACTIONS + "?|" + _UPPER + _CONTRACTIONS + r"?|\p{N}{1,3}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
DIGIT, DIGITS = r"\p{N}", r"\p{N}+"

# llama.cpp pre-tokenizer name -> the split steps (in order) a HF pre-tokenizer with that behaviour has.
# Each name is one llama-vocab.cpp accepts; several HF spellings share llama.cpp's regexes.
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "gpt-2": (GPT2_SPLIT,),                      # ByteLevel(use_regex=True)
    "smollm": (DIGIT, GPT2_SPLIT),               # Digits(individual) + ByteLevel (SmolLM, StarCoder)
    "llama-bpe": (LLAMA3_SPLIT,),                # Llama-3
    "qwen2": (QWEN2_SPLIT,),                     # Qwen2 / Qwen2.5 / Qwen3
    "qwen35": (QWEN35_SPLIT,),
    "seed-coder": (SEED_CODER_SPLIT,),
    "tekken": (TEKKEN_SPLIT,),                   # Mistral Nemo
    "gpt-4o": (GPT4O_SPLIT,),                    # GPT-4o / Llama-4 style
    "minicpm5": (r"\p{N}{1,3}", MINICPM5_SPLIT),
}
DEFAULT_PRE = "default"
# Below this similarity an unknown pre-tokenizer gets llama.cpp's generic "default" instead.
CLOSEST_MIN_RATIO = 0.6

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
TT = gguf.TokenType


def _backend_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"GGUF export needs a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}")
    return json.loads(backend.to_str())


def _steps(node: Optional[dict]) -> list[dict]:
    """A pre-tokenizer / decoder / normalizer JSON node flattened into its steps."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        children = node.get("pretokenizers") or node.get("decoders") or node.get("normalizers") or []
        return [s for child in children for s in _steps(child)]
    return [node]


def tokenizer_kind(tokenizer_json: dict) -> str:
    """'gpt2' (byte-level BPE) or 'llama' (SentencePiece-style); ExportError for anything else."""
    model = tokenizer_json.get("model") or {}
    mtype = model.get("type")
    steps = _steps(tokenizer_json.get("pre_tokenizer")) + _steps(tokenizer_json.get("decoder"))
    byte_level = any(s.get("type") == "ByteLevel" for s in steps)
    if mtype == "BPE" and byte_level:
        return "gpt2"
    spm_like = model.get("byte_fallback") or any(s.get("type") in ("Metaspace", "ByteFallback") for s in steps)
    if mtype == "Unigram" or (mtype == "BPE" and spm_like):
        return "llama"
    raise ExportError(f"GGUF export cannot write a {mtype} tokenizer: llama.cpp reads byte-level BPE "
                      "(GPT-2 style) or SentencePiece-style (BPE with byte fallback, Unigram) vocabularies; "
                      "pass tokenizer=None to write the model without one")


def check_gguf_tokenizer(tokenizer) -> Optional[str]:
    """The GGUF tokenizer kind ('gpt2' / 'llama') for `tokenizer`, None for no tokenizer; ExportError if unsupported."""
    return None if tokenizer is None else tokenizer_kind(_backend_json(tokenizer))


def _normalize_regex(rx: str) -> str:
    # Some tokenizer.json files hold real CR/LF characters inside classes where others write \r \n.
    return rx.replace("\r", r"\r").replace("\n", r"\n")


def split_steps(pre_tokenizer: Optional[dict]) -> tuple[str, ...]:
    """The pre-tokenizer as a tuple of split regexes, in the order they apply.

    ByteLevel(use_regex=True) contributes GPT-2's regex, Digits \\p{N} or \\p{N}+, Split its regex; other
    steps are spelled "<Type>" so they never match a table entry by accident.
    """
    out = []
    for step in _steps(pre_tokenizer):
        kind = step.get("type")
        if kind == "ByteLevel":
            if step.get("use_regex", True):
                out.append(GPT2_SPLIT)
        elif kind == "Digits":
            out.append(DIGIT if step.get("individual_digits") else DIGITS)
        elif kind == "Split":
            pattern = step.get("pattern") or {}
            regex = pattern.get("Regex", re.escape(pattern.get("String", "")))
            isolated = str(step.get("behavior", "")).lower() == "isolated" and not step.get("invert")
            out.append(_normalize_regex(regex) if isolated else f"<Split {step.get('behavior')} {regex}>")
        else:
            out.append(f"<{kind}>")
    return tuple(out)


def choose_pre_tokenizer(pre_tokenizer: Optional[dict]) -> str:
    """llama.cpp's `tokenizer.ggml.pre` name for a HF pre-tokenizer (JSON node); never raises.

    Exact match of the split steps first; otherwise the entry whose steps read most alike (difflib
    ratio >= CLOSEST_MIN_RATIO), else "default", with a warning: llama.cpp will then split some texts
    differently from the original tokenizer.
    """
    steps = split_steps(pre_tokenizer)
    if any(s.get("type") == "ByteLevel" and s.get("add_prefix_space") for s in _steps(pre_tokenizer)):
        logger.warning("GGUF: the tokenizer adds a prefix space (ByteLevel add_prefix_space=True); llama.cpp's "
                       "byte-level BPE does not, so a text's first word may tokenize differently")
    for name, known in PRE_TOKENIZERS.items():
        if steps == known:
            return name
    text = "\n".join(steps)
    ratio, best = max((difflib.SequenceMatcher(None, text, "\n".join(known)).ratio(), name)
                      for name, known in PRE_TOKENIZERS.items())
    chosen = best if ratio >= CLOSEST_MIN_RATIO else DEFAULT_PRE
    logger.warning("GGUF: pre-tokenizer not recognised (splits: %s); writing tokenizer.ggml.pre=%r "
                   "(closest known: %r, similarity %.2f). llama.cpp may tokenize some texts differently.",
                   " ; ".join(steps) or "none", chosen, best, ratio)
    return chosen


def _looks_special(token: str) -> bool:
    """llama.cpp's heuristic for added tokens that should be control tokens although not marked special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _token_table(tokenizer, n_vocab: int, kind: str, unk_id: Optional[int]) -> tuple[list[str], list[int]]:
    vocab = tokenizer.get_vocab()
    if vocab and max(vocab.values()) >= n_vocab:
        raise ExportError(f"GGUF export: the tokenizer has token id {max(vocab.values())} but the model's "
                          f"vocab_size is {n_vocab}")
    added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
    reverse = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        tok = reverse.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(TT.UNUSED)
            continue
        tokens.append(tok)
        if kind == "llama" and i == unk_id:
            types.append(TT.UNKNOWN)
        elif tok in added:
            types.append(TT.CONTROL if added[tok] or _looks_special(tok) else TT.USER_DEFINED)
        elif kind == "llama" and _BYTE_TOKEN.fullmatch(tok):
            types.append(TT.BYTE)
        else:
            types.append(TT.NORMAL)
    return tokens, types


def _merges(model: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]


def _spm_scores(model: dict, tokens: list[str]) -> list[float]:
    """Unigram: the model's log-probabilities. BPE: -rank of the first merge producing the token
    (earlier merge = higher score, the priority llama.cpp's SentencePiece tokenizer merges by); 0 else."""
    if model.get("type") == "Unigram":
        scores = {piece: float(score) for piece, score in model.get("vocab") or []}
        return [scores.get(t, 0.0) for t in tokens]
    rank: dict[str, int] = {}
    for r, merge in enumerate(_merges(model)):
        left, _, right = merge.partition(" ")
        rank.setdefault(left + right, r)
    return [-float(rank[t] + 1) if t in rank else 0.0 for t in tokens]


def _special_id(tokenizer, attr: str, *fallbacks) -> Optional[int]:
    value = getattr(tokenizer, f"{attr}_token_id", None)
    for source in fallbacks:
        if value is not None:
            break
        value = getattr(source, f"{attr}_token_id", None) if source is not None else None
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return None if value is None else int(value)


def _adds_specials(tokenizer, bos: Optional[int], eos: Optional[int]) -> tuple[bool, bool]:
    """(add_bos, add_eos), read off what encoding a text actually does."""
    with_special = tokenizer.encode("a", add_special_tokens=True)
    plain = tokenizer.encode("a", add_special_tokens=False)
    extra = len(with_special) > len(plain)
    add_bos = extra and bos is not None and with_special[:1] == [bos] and plain[:1] != [bos]
    add_eos = extra and eos is not None and with_special[-1:] == [eos] and plain[-1:] != [eos]
    return add_bos, add_eos


def _chat_template(tokenizer) -> Any:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        return [{"name": name, "template": tpl} for name, tpl in template.items()]
    return template or None


def write_tokenizer(writer: gguf.GGUFWriter, tokenizer, config, generation_config=None) -> Optional[str]:
    """Add the tokenizer metadata to `writer`; returns the kind written ('gpt2' / 'llama' / None).

    config: the text config (its vocab_size sets the token count; ids the tokenizer lacks are padding).
    Special ids come from the tokenizer, then generation_config, then config (llama.cpp reads config.json
    the same way). tokenizer None: tokenizer.ggml.model = "none" (llama.cpp's no-vocabulary marker).
    """
    if tokenizer is None:
        logger.warning("GGUF export without a tokenizer: the file has no vocabulary (tokenizer.ggml.model='none')")
        writer.add_tokenizer_model("none")
        return None
    tj = _backend_json(tokenizer)
    kind = tokenizer_kind(tj)
    model = tj["model"]
    ids = {attr: _special_id(tokenizer, attr, generation_config, config) for attr in ("bos", "eos", "pad")}
    ids["unk"] = _special_id(tokenizer, "unk")
    tokens, types = _token_table(tokenizer, int(config.vocab_size), kind, ids["unk"])
    writer.add_tokenizer_model(kind)
    if kind == "gpt2":
        writer.add_tokenizer_pre(choose_pre_tokenizer(tj.get("pre_tokenizer")))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        merges = _merges(model)
        if merges:
            writer.add_token_merges(merges)
        else:  # gguf-py cannot write an empty array
            logger.warning("GGUF: this byte-level BPE tokenizer has no merges; llama.cpp refuses a 'gpt2' "
                           "vocabulary without tokenizer.ggml.merges (transformers loads the model, not the tokenizer)")
    else:
        writer.add_tokenizer_pre(DEFAULT_PRE)
        writer.add_token_list(tokens)
        writer.add_token_scores(_spm_scores(model, tokens))
        writer.add_token_types(types)
        if model.get("type") == "BPE" and model.get("merges"):
            writer.add_token_merges(_merges(model))  # unused by llama.cpp; lets transformers rebuild BPE exactly
        first = tokenizer.convert_ids_to_tokens(tokenizer.encode("a", add_special_tokens=False))[:1]
        writer.add_add_space_prefix(bool(first) and first[0].startswith("\u2581"))
    for attr, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if ids[attr] is not None and 0 <= ids[attr] < len(tokens):
            add(ids[attr])
    add_bos, add_eos = _adds_specials(tokenizer, ids["bos"], ids["eos"])
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    if (template := _chat_template(tokenizer)) is not None:
        writer.add_chat_template(template)
    return kind
