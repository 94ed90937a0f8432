"""Calibration data: text sources -> fixed-shape token batches `[nsamples, seqlen]`.

`dataset` is None (hub "NeelNanda/pile-10k"; when the hub is unreachable, the bundled offline Wikipedia
text of `offline_text` with a logged warning), a list of strings, or comma-separated specs: a local file
(`.txt`: documents separated by blank lines; `.json`: list of strings or of {"text": ...}; `.jsonl`: one
{"text": ...} or JSON string per line), a hub dataset name (column "text") or `offline-wikipedia`, each with
`:key=value` options: `num` (samples from that source), `concat` (pack every text, long ones split rather
than truncated), `split` (hub split; `a+b` for several, and a bare `name:train` means split=train),
`apply_chat_template` (each text becomes a user turn of the tokenizer's chat template) and `system_prompt=...`
(with it; takes the rest of the spec). Example: `a.json,b.jsonl:num=64:concat=true`.

Pre-tokenized data skips all of this: a LongTensor [n, T] is used as given, and a torch DataLoader of token
batches is read into one (`calib_batches.ids_from_batches`, called by AutoRound).

Sources with `num` get that many samples, the rest of `nsamples` is split evenly over the others; the
result is shuffled with `seed`. Texts of >= seqlen tokens are truncated to one sample; shorter ones are
packed (eos between texts) into exact seqlen chunks, never dropped; a last partial chunk is right-padded
and masked out.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import socket
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["CalibrationDataError", "CalibrationSet", "build_calibration_set", "DEFAULT_HUB_DATASET", "BUNDLED_NAME"]

logger = logging.getLogger("auto_round")

DEFAULT_HUB_DATASET = "NeelNanda/pile-10k"
HUB_ALIASES = {"pile-10k": DEFAULT_HUB_DATASET}
BUNDLED_NAME = "offline-wikipedia"
LOCAL_SUFFIXES = (".txt", ".json", ".jsonl")
OPTION_KEYS = ("num", "concat", "split", "apply_chat_template", "system_prompt")
_OFFLINE_WORDS = ("connection", "timeout", "timed out", "offline", "localentrynotfound", "couldn't reach",
                  "name or service not known", "name resolution")
_BOOLS = {"": True, "true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
LOCAL_ALTERNATIVES = ("use local data instead: a .txt/.json/.jsonl file path, a list of strings, or leave dataset "
                      f"unset (or pass '{BUNDLED_NAME}') to use the bundled offline Wikipedia text")


class CalibrationDataError(ValueError):
    """The calibration data cannot be built; the message names the problem."""


@dataclass
class CalibrationSet:
    """Tokenized calibration samples.

    input_ids:      LongTensor [n, seqlen], token ids (padding positions hold the pad id).
    attention_mask: LongTensor [n, seqlen], 1 on real tokens, 0 on right padding.
    description:    human-readable summary of the sources, for the log.
    """

    input_ids: torch.LongTensor
    attention_mask: torch.LongTensor
    description: str


@dataclass
class _Source:
    """One text source: `texts` is indexable (hub datasets are read lazily)."""

    name: str
    texts: Sequence[str | None]
    num: int | None = None
    concat: bool | None = False  # None = "auto": one sample per text, then pack the unused tails
    chat: bool = False  # each text becomes a user turn of the tokenizer's chat template (apply_chat_template)
    system_prompt: str | None = None  # with chat: a system turn before it


@dataclass
class _Sample:
    ids: list[int]  # exactly seqlen ids
    valid: int  # number of real (unpadded) tokens
    packed: bool  # a chunk of packed short texts (vs. one truncated/full-length text)


@dataclass
class _Stats:
    texts_read: int = 0
    truncated: int = 0
    packed_texts: int = 0
    per_source: list[str] = field(default_factory=list)


def _parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """`name:key=value:...` -> (name, {"num": int, "concat": bool, "split": str, "apply_chat_template": bool,
    "system_prompt": str}). A bare `name:train` (or `train+validation`) is the split, as in the reference's docs;
    `system_prompt=` takes the rest of the spec, colons included."""
    name, *parts = [p.strip() for p in spec.split(":")]
    opts: dict[str, Any] = {}
    for part in parts:
        if not part:
            continue
        key, value = (x.strip() for x in part.partition("=")[::2])
        key = key.lower()
        if key == "system_prompt":
            opts["system_prompt"] = spec[spec.lower().index("system_prompt=") + len("system_prompt="):].strip()
            break
        if "=" not in part and key not in OPTION_KEYS and re.fullmatch(r"[\w\[\]%.+-]+", part):
            key, value = "split", part
        if key not in OPTION_KEYS:
            raise CalibrationDataError(f"dataset spec {spec!r}: unknown option key {key!r} "
                                       f"(known options: {', '.join(OPTION_KEYS)})")
        if key == "num":
            if not value.isdigit() or int(value) < 1:
                raise CalibrationDataError(f"dataset spec {spec!r}: num={value!r} must be a positive integer")
            opts["num"] = int(value)
        elif key in ("concat", "apply_chat_template"):
            if value.lower() not in _BOOLS:
                raise CalibrationDataError(f"dataset spec {spec!r}: {key}={value!r} must be true or false")
            opts[key] = _BOOLS[value.lower()]
        elif not value:
            raise CalibrationDataError(f"dataset spec {spec!r}: split needs a value, e.g. split=train")
        else:
            opts["split"] = value
    if not name:
        raise CalibrationDataError(f"dataset spec {spec!r} has no dataset name or file path")
    return name, opts


def _text_of(item: Any, where: str) -> str:
    text = item.get("text") if isinstance(item, dict) else item
    if isinstance(text, str):
        return text
    raise CalibrationDataError(f"{where}: expected a string or an object with a string \"text\" field, "
                               f"got {item!r:.80}")


def _json(raw: str, where: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError as e:
        raise CalibrationDataError(f"{where} is not valid JSON: {e}") from e


def _read_local(path: Path) -> list[str]:
    """Documents of a .txt/.json/.jsonl file, blank ones removed."""
    if not path.is_file():
        raise CalibrationDataError(f"calibration file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise CalibrationDataError(f"unsupported calibration file type {path}: use one of {', '.join(LOCAL_SUFFIXES)}")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationDataError(f"cannot read calibration file {path}: {e}") from e
    if suffix == ".txt":
        texts = re.split(r"\n[ \t\r\f\v]*\n", raw)
    elif suffix == ".json":
        data = _json(raw, str(path))
        if not isinstance(data, list):
            raise CalibrationDataError(f"{path}: a .json dataset must be a list of strings or of "
                                       "{\"text\": ...} objects")
        texts = [_text_of(item, f"{path} item {i}") for i, item in enumerate(data)]
    else:  # .jsonl
        lines = [(f"{path} line {n}", line) for n, line in enumerate(raw.splitlines(), 1) if line.strip()]
        texts = [_text_of(_json(line, where), where) for where, line in lines]
    texts = [t.strip() for t in texts if t.strip()]
    if not texts:
        raise CalibrationDataError(f"calibration file {path} contains no usable text")
    return texts


def _is_local_spec(name: str) -> bool:
    return name.lower().endswith(LOCAL_SUFFIXES) or os.path.exists(name) or name.startswith(("./", "../", "/", "~"))


def _hub_probe_failure(timeout: float = 3.0) -> str | None:
    """Why the hub is unreachable (fast TCP probe), or None: try loading (also in HF offline mode, via a proxy)."""
    try:
        from huggingface_hub import constants

        endpoint, offline = constants.ENDPOINT, bool(constants.HF_HUB_OFFLINE)
    except Exception:
        endpoint, offline = "https://huggingface.co", False
    if offline or any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urllib.parse.urlsplit(endpoint)
    port = url.port or {"https": 443, "http": 80}.get(url.scheme, 443)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:
        return f"cannot connect to {url.hostname}:{port}: {e}"
    return None


def _load_hub_dataset(name: str, split: str) -> Any:
    """`datasets.load_dataset(name, split=split)`; raises ConnectionError quickly when the hub is unreachable."""
    try:
        import datasets
    except ImportError:
        raise CalibrationDataError(f"hub dataset {name!r} needs the 'datasets' package (pip install datasets); "
                                   + LOCAL_ALTERNATIVES) from None
    if (reason := _hub_probe_failure()) is not None:
        raise ConnectionError(reason)
    return datasets.load_dataset(name, split=split)


def _is_connection_error(exc: BaseException | None) -> bool:
    for _ in range(8):  # the exception and its causes
        if exc is None:
            return False
        if isinstance(exc, (ConnectionError, TimeoutError)) or any(w in f"{type(exc).__name__} {exc}".lower()
                                                                   for w in _OFFLINE_WORDS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _hub_source(name: str, split: str = "train", num: int | None = None, concat: bool = False) -> _Source:
    try:
        ds = _load_hub_dataset(name, split)
    except CalibrationDataError:
        raise
    except Exception as e:
        if _is_connection_error(e):
            raise CalibrationDataError(f"hub dataset {name!r} cannot be loaded: the Hugging Face hub is unreachable "
                                       f"({e}); {LOCAL_ALTERNATIVES}") from e
        raise CalibrationDataError(f"hub dataset {name!r} (split {split!r}) could not be loaded: {e}") from e
    columns = list(getattr(ds, "column_names", None) or [])
    if "text" not in columns or len(ds) == 0:
        raise CalibrationDataError(f"hub dataset {name!r} (split {split!r}) has no \"text\" column or no rows "
                                   f"(columns: {columns}, rows: {len(ds)})")
    return _Source(name, ds["text"], num, concat)  # datasets>=4: a lazy column (rows read on access)


def _bundled_source(num: int | None = None, concat: bool | None = None) -> _Source:
    """The bundled Wikipedia calibration articles.

    concat None ("auto"): one sample per article while articles last (diverse samples, like one document
    per sample from pile-10k); only then are the articles' unused tails packed, so 80 articles still
    fill 128 x 2048 tokens.
    """
    from .offline_text import OfflineTextError, calibration_texts

    try:
        texts = calibration_texts()
    except OfflineTextError as e:
        raise CalibrationDataError(f"the bundled offline text is unavailable: {e}") from e
    return _Source(f"{BUNDLED_NAME} (gensim Wikipedia articles 0-79)", texts, num, concat)


def _source_from_spec(spec: str) -> _Source:
    name, opts = _parse_spec(spec)
    num, concat = opts.get("num"), opts.get("concat", False)
    if "system_prompt" in opts and not opts.get("apply_chat_template"):
        raise CalibrationDataError(f"dataset spec {spec!r}: system_prompt needs apply_chat_template")
    if name.lower() == BUNDLED_NAME:
        src = _bundled_source(num, opts.get("concat"))
    elif _is_local_spec(name):
        if "split" in opts:
            raise CalibrationDataError(f"dataset spec {spec!r}: split applies only to hub datasets, not to files")
        path = Path(name).expanduser()
        src = _Source(str(path), _read_local(path), num, concat)
    else:
        src = _hub_source(HUB_ALIASES.get(name, name), opts.get("split", "train"), num, concat)
    src.chat, src.system_prompt = opts.get("apply_chat_template", False), opts.get("system_prompt")
    if src.chat:
        src.name += " (chat template" + (", system prompt)" if src.system_prompt else ")")
    return src


def _default_sources() -> list[_Source]:
    try:
        return [_hub_source(DEFAULT_HUB_DATASET)]
    except CalibrationDataError as e:
        logger.warning("default calibration dataset %s is not available (%s); falling back to the bundled offline "
                       "Wikipedia text (gensim test data, articles 0-79)", DEFAULT_HUB_DATASET,
                       str(e).replace(f"; {LOCAL_ALTERNATIVES}", ""))
        return [_bundled_source()]


def _resolve_sources(dataset: Any) -> list[_Source]:
    if dataset is None:
        return _default_sources()
    if isinstance(dataset, str):
        specs = [s.strip() for s in dataset.split(",") if s.strip()]
        if not specs:
            raise CalibrationDataError(f"dataset string {dataset!r} names no dataset")
        return [_source_from_spec(s) for s in specs]
    if isinstance(dataset, (list, tuple)):
        if not dataset:
            raise CalibrationDataError("the calibration dataset is an empty list")
        bad = [type(t).__name__ for t in dataset if not isinstance(t, str)]
        if bad:
            raise CalibrationDataError(f"a calibration list must contain only strings, found {sorted(set(bad))}")
        texts = [t for t in dataset if t.strip()]
        if not texts:
            raise CalibrationDataError(f"the calibration list ({len(dataset)} strings) contains no usable text")
        return [_Source(f"list of {len(texts)} texts", texts)]
    raise CalibrationDataError(f"unsupported dataset type {type(dataset).__name__}: pass None, a list of strings, "
                               "or a string of comma-separated file paths / hub dataset names")


class _Packer:
    """Concatenates token lists (eos between texts) and cuts the stream into exact seqlen chunks."""

    def __init__(self, seqlen: int, sep_id: int | None) -> None:
        self.seqlen, self.sep_id = seqlen, sep_id
        self.buf: list[int] = []
        self.last: int | None = None  # last token of the previous text, None before the first

    def add(self, ids: list[int]) -> list[list[int]]:
        """Append one text's ids; returns the chunks completed by it (each exactly seqlen long)."""
        sep = self.sep_id
        if self.last is not None and sep is not None and self.last != sep and ids[0] != sep:
            self.buf.append(sep)
        self.buf.extend(ids)
        self.last = ids[-1]
        n_full = len(self.buf) // self.seqlen
        chunks = [self.buf[i * self.seqlen:(i + 1) * self.seqlen] for i in range(n_full)]
        self.buf = self.buf[n_full * self.seqlen:]
        return chunks

    def flush(self, pad_id: int) -> _Sample | None:
        """The partial last chunk, right-padded with pad_id, or None when nothing is left."""
        buf, self.buf = self.buf, []
        return _Sample(buf + [pad_id] * (self.seqlen - len(buf)), len(buf), packed=True) if buf else None


def _tokenize(tokenizer: Any, text: str, src: "_Source | None" = None) -> list[int]:
    """Token ids of one text, special tokens as the tokenizer adds them by default; no length warning. With the
    source's chat option the text is the user turn of the tokenizer's chat template (generation prompt added),
    whose own special tokens are kept and no others added."""
    if src is not None and src.chat:
        turns = ([{"role": "system", "content": src.system_prompt}] if src.system_prompt else []) + \
                [{"role": "user", "content": text}]
        if not getattr(tokenizer, "chat_template", None):
            raise CalibrationDataError(f"calibration source {src.name}: apply_chat_template, but the tokenizer has "
                                       "no chat template")
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    else:
        ids = tokenizer(text, verbose=False)["input_ids"]
    return [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]


def _samples_from(src: _Source, count: int, tokenizer: Any, seqlen: int, rng: random.Random,
                  stats: _Stats) -> list[_Sample]:
    """Up to `count` samples from `src`, reading its texts in a seeded random order."""
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = next((i for i in (getattr(tokenizer, "pad_token_id", None), eos) if i is not None), 0)
    order = list(range(len(src.texts)))
    rng.shuffle(order)
    packer, out, n_tokens = _Packer(seqlen, eos), [], 0
    tails: list[list[int]] = []  # unused ends of truncated texts, packed last when concat is None ("auto")
    for idx in order:
        if len(out) >= count:
            break
        text = src.texts[idx]
        ids = _tokenize(tokenizer, text, src) if isinstance(text, str) and text.strip() else []
        if not ids:
            continue
        stats.texts_read += 1
        n_tokens += len(ids)
        if not src.concat and len(ids) >= seqlen:
            stats.truncated += len(ids) > seqlen
            out.append(_Sample(ids[:seqlen], seqlen, packed=False))
            if src.concat is None and len(ids) > seqlen:
                tails.append(ids[seqlen:])
        else:
            stats.packed_texts += 1
            out.extend(_Sample(c, seqlen, packed=True) for c in packer.add(ids))
    for rest in tails:
        if len(out) >= count:
            break
        out.extend(_Sample(c, seqlen, packed=True) for c in packer.add(rest))
    if len(out) < count and (tail := packer.flush(pad)) is not None:
        out.append(tail)
    if n_tokens == 0:
        raise CalibrationDataError(f"calibration source {src.name} yields zero tokens")
    if len(out) < count:
        logger.warning("calibration source %s ran out of text: %d of %d samples", src.name, len(out), count)
    return out[:count]


def _allocate_and_sample(sources: list[_Source], nsamples: int, tokenizer: Any, seqlen: int,
                         seed: int, stats: _Stats) -> list[_Sample]:
    """Sources with `num` first (exactly num each), then the rest of nsamples split evenly over the others."""
    master = random.Random(seed)
    rngs = [random.Random(master.getrandbits(64)) for _ in sources]
    order = sorted(range(len(sources)), key=lambda i: sources[i].num is None)  # stable: explicit num first
    n_free = sum(s.num is None for s in sources)
    samples: list[_Sample] = []
    for i in order:
        src = sources[i]
        count = src.num
        if count is None:  # an even share of what is left; the last free source takes the remainder
            count, n_free = max(0, nsamples - len(samples)) // n_free, n_free - 1
            count = count if n_free else max(0, nsamples - len(samples))
        if count == 0:
            logger.warning("calibration source %s gets 0 samples (nsamples=%d already used up)", src.name, nsamples)
            stats.per_source.append(f"{src.name}: 0")
            continue
        got = _samples_from(src, count, tokenizer, seqlen, rngs[i], stats)
        stats.per_source.append(f"{src.name}: {len(got)}")
        samples.extend(got)
    random.Random(master.getrandbits(64)).shuffle(samples)
    return samples


def build_calibration_set(tokenizer: Any, dataset: Any = None, *, seqlen: int = 2048, nsamples: int = 128,
                          seed: int = 42) -> CalibrationSet:
    """Tokenize `dataset` (see module doc) into `nsamples` samples of exactly `seqlen` tokens.

    Returns a `CalibrationSet` with input_ids / attention_mask of shape [n, seqlen], n <= nsamples unless
    explicit `num=` options ask for more (a warning is logged when the text runs out before nsamples).
    Deterministic for a given seed. Raises `CalibrationDataError` on unusable input.
    """
    for name, value in (("seqlen", seqlen), ("nsamples", nsamples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CalibrationDataError(f"{name} must be a positive integer, got {value!r}")
    if tokenizer is None or not callable(tokenizer):
        raise CalibrationDataError("a tokenizer is required to build the calibration set")
    sources = _resolve_sources(dataset)
    stats = _Stats()
    samples = _allocate_and_sample(sources, nsamples, tokenizer, seqlen, seed, stats)
    if not samples:
        raise CalibrationDataError(f"the calibration dataset yields zero tokens ({'; '.join(stats.per_source)})")
    input_ids = torch.tensor([s.ids for s in samples], dtype=torch.long)
    valid = torch.tensor([s.valid for s in samples], dtype=torch.long)
    attention_mask = (torch.arange(seqlen).unsqueeze(0) < valid.unsqueeze(1)).long()
    logger.info("calibration data: %d texts read, %d truncated to %d tokens, %d texts packed into %d chunk(s); "
                "%d samples x %d tokens, %d padded tokens", stats.texts_read, stats.truncated, seqlen,
                stats.packed_texts, sum(s.packed for s in samples), len(samples), seqlen,
                int(seqlen * len(samples) - valid.sum()))
    if len(samples) < nsamples:
        logger.warning("only %d calibration samples of the %d requested (seqlen %d): %s", len(samples), nsamples,
                       seqlen, "; ".join(stats.per_source))
    description = ", ".join(stats.per_source) if len(sources) > 1 else f"{sources[0].name}: {len(samples)} samples"
    return CalibrationSet(input_ids, attention_mask, description)
