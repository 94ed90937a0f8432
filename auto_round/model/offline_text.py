"""Real English text that works offline: 107 Wikipedia articles shipped in gensim's test data.

The `gensim` wheel (`pip install gensim==4.4.0`, or `pip install auto-round[data]`) contains a shortened
enwiki XML dump (`gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`).
It is extracted once with gensim's own wiki-markup stripper (`extract_pages` + `filter_wiki`, ~4 s) and
cached as JSON under `~/.cache/auto_round/`.

Fixed split by article index (never mix them):
    * `calibration_texts()`: articles 0-79, the calibration pool;
    * `heldout_texts()`:     articles 80-106, held out for perplexity evaluation.

Text is CC-BY-SA (Wikipedia); gensim is LGPL-2.1 and only read at run time from site-packages.
"""

from __future__ import annotations

import bz2
import importlib.util
import json
import os
import re
import tempfile
from functools import lru_cache
from pathlib import Path

__all__ = [
    "OfflineTextError",
    "wikipedia_articles",
    "calibration_texts",
    "heldout_texts",
    "CALIBRATION_ARTICLES",
    "HELDOUT_ARTICLES",
]

WIKI_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
CACHE_NAME = "gensim_enwiki_articles.json"
CACHE_FORMAT = 1
EXPECTED_ARTICLES = 107
CALIBRATION_ARTICLES = range(0, 80)
HELDOUT_ARTICLES = range(80, 107)
INSTALL_HINT = "pip install gensim==4.4.0  (or: pip install auto-round[data])"


class OfflineTextError(RuntimeError):
    """The bundled offline text cannot be produced (gensim missing, or its test data not found)."""


def default_cache_dir() -> Path:
    """`~/.cache/auto_round`, where the extracted articles are cached."""
    return Path.home() / ".cache" / "auto_round"


def _gensim_dump_path() -> Path:
    """Path of the enwiki dump inside the installed gensim package, without importing gensim."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise OfflineTextError(
            "the bundled offline Wikipedia text needs the 'gensim' package, which is not installed: " + INSTALL_HINT
        )
    path = Path(list(spec.submodule_search_locations)[0]) / WIKI_DUMP
    if not path.is_file():
        raise OfflineTextError(f"gensim is installed but its test data file {path} is missing; "
                               f"reinstall: {INSTALL_HINT}")
    return path


def _clean_article(wiki_markup: str) -> str:
    """Wiki markup -> plain text: gensim's `filter_wiki`, bold/italic quotes and table rows dropped."""
    from gensim.corpora.wikicorpus import filter_wiki

    body = re.sub(r"'{2,}", "", filter_wiki(wiki_markup))
    lines = [line.strip() for line in body.splitlines()]
    lines = [line for line in lines if len(line) > 1 and not line.startswith(("|", "!", "{", "}"))]
    return "\n".join(lines)


def _extract(dump: Path) -> list[tuple[str, str]]:
    """All non-redirect main-namespace articles of `dump` as (title, clean text), in dump order."""
    try:
        from gensim.corpora.wikicorpus import extract_pages
    except ImportError as e:  # pragma: no cover - find_spec found it, but importing failed
        raise OfflineTextError(f"could not import gensim ({e}): {INSTALL_HINT}") from e
    articles = []
    with bz2.open(str(dump), "rb") as f:
        for title, text, _ in extract_pages(f, filter_namespaces=("0",)):
            if text.lower().startswith("#redirect"):
                continue
            articles.append((title, _clean_article(text)))
    return articles


def _read_cache(path: Path, source_size: int | None) -> list[tuple[str, str]] | None:
    """Cached articles, or None when the cache is absent, unreadable or made from another source file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != CACHE_FORMAT:
            return None
        if source_size is not None and data.get("source_size") != source_size:
            return None
        articles = [(str(t), str(b)) for t, b in data["articles"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return articles if articles else None


def _write_cache_atomic(path: Path, articles: list[tuple[str, str]], source_size: int) -> None:
    """Write the JSON cache through a temp file + `os.replace`, so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": CACHE_FORMAT, "source": WIKI_DUMP, "source_size": source_size, "articles": articles}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f, ensure_ascii=False)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@lru_cache(maxsize=4)
def _articles_cached(cache_dir: Path) -> tuple[tuple[str, str], ...]:
    cache = cache_dir / CACHE_NAME
    try:
        dump = _gensim_dump_path()
    except OfflineTextError:
        cached = _read_cache(cache, None)  # gensim gone but a previous extraction is still there: use it
        if cached is not None:
            return tuple(cached)
        raise
    size = dump.stat().st_size
    cached = _read_cache(cache, size)
    if cached is None:
        cached = _extract(dump)
        try:
            _write_cache_atomic(cache, cached, size)
        except OSError:
            pass  # read-only home etc.: the text is still returned, just not cached
    return tuple(cached)


def wikipedia_articles(cache_dir: Path | None = None) -> list[tuple[str, str]]:
    """The 107 bundled Wikipedia articles as (title, plain text), in dump order.

    Extracted from gensim's test data on first use and cached as JSON in `cache_dir`
    (default `~/.cache/auto_round/`). Raises `OfflineTextError` when gensim is not installed.
    """
    directory = Path(cache_dir).expanduser().resolve() if cache_dir is not None else default_cache_dir()
    return list(_articles_cached(directory))


def _texts(indices: range, cache_dir: Path | None) -> list[str]:
    articles = wikipedia_articles(cache_dir)[indices.start:indices.stop]
    return [text for _, text in articles if text.strip()]


def calibration_texts(cache_dir: Path | None = None) -> list[str]:
    """Articles 0-79 (plain text, one string per article): the offline calibration pool (80 texts)."""
    return _texts(CALIBRATION_ARTICLES, cache_dir)


def heldout_texts(cache_dir: Path | None = None) -> list[str]:
    """Articles 80-106: held out for perplexity, never for calibration.

    26 texts: article 89 ("Wikipedia:Adding Wikipedia articles to Nupedia") has no text and is skipped.
    """
    return _texts(HELDOUT_ARTICLES, cache_dir)
