"""Calibration-data layer: local files, lists, mixing, packing, determinism, errors, offline fallback."""

from __future__ import annotations

import json
import logging
import random
from collections import Counter

import pytest
import torch

from auto_round.model import calib_data, offline_text
from auto_round.model.calib_data import CalibrationDataError, CalibrationSet, build_calibration_set

GREEK = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()
NUMBERS = "one two three four five six seven eight nine ten eleven twelve".split()
EOS, PAD = 2, 1  # ids of </s> and <pad> in the tiny_tokenizer fixture


def words(pool: list[str], n: int, start: int = 0) -> str:
    """A text of exactly n words from pool (n tokens for tiny_tokenizer)."""
    return " ".join(pool[(start + i) % len(pool)] for i in range(n))


def ids_of(tok, pool: list[str]) -> set[int]:
    return {tok.convert_tokens_to_ids(w) for w in pool}


def rows(calib: CalibrationSet) -> list[list[int]]:
    """Unpadded rows as lists of ids."""
    return [r[m.bool()].tolist() for r, m in zip(calib.input_ids, calib.attention_mask)]


@pytest.fixture(scope="session")
def wiki_cache(tmp_path_factory):
    pytest.importorskip("gensim")
    cache = tmp_path_factory.mktemp("wiki_cache")
    offline_text.wikipedia_articles(cache)  # ~3 s once per session
    return cache


@pytest.fixture
def bundled_from_session_cache(wiki_cache, monkeypatch):
    """Make the default (~/.cache) location point at the session cache."""
    monkeypatch.setattr(offline_text, "default_cache_dir", lambda: wiki_cache)
    return wiki_cache


@pytest.fixture
def hub_down(monkeypatch):
    def unreachable(name, split):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (offline)")

    monkeypatch.setattr(calib_data, "_load_hub_dataset", unreachable)


# ------------------------------------------------------------------------------------------ local formats


def test_json_list_of_strings_and_dicts(tmp_path, tiny_tokenizer):
    (tmp_path / "s.json").write_text(json.dumps([words(GREEK, 20, i) for i in range(5)]))
    (tmp_path / "d.json").write_text(json.dumps([{"text": words(GREEK, 20, i), "id": i} for i in range(5)]))
    for name in ("s.json", "d.json"):
        calib = build_calibration_set(tiny_tokenizer, str(tmp_path / name), seqlen=8, nsamples=5)
        assert calib.input_ids.shape == calib.attention_mask.shape == (5, 8)
        assert calib.input_ids.dtype == calib.attention_mask.dtype == torch.long
        assert calib.attention_mask.all()  # 20-word texts truncated to 8: no padding
        assert name in calib.description


def test_jsonl_objects_and_strings(tmp_path, tiny_tokenizer):
    lines = [json.dumps({"text": words(NUMBERS, 10, i)}) for i in range(3)] + ["", json.dumps(words(NUMBERS, 10))]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    calib = build_calibration_set(tiny_tokenizer, str(tmp_path / "a.jsonl"), seqlen=10, nsamples=4)
    assert calib.input_ids.shape == (4, 10) and calib.attention_mask.all()
    assert all(set(r) <= ids_of(tiny_tokenizer, NUMBERS) for r in rows(calib))


def test_txt_split_on_blank_lines(tmp_path, tiny_tokenizer):
    paragraphs = [words(GREEK, 6, 0), words(NUMBERS, 6, 0), words(GREEK, 6, 7)]
    (tmp_path / "doc.txt").write_text("\n\n".join(paragraphs) + "\n  \n\n")
    calib = build_calibration_set(tiny_tokenizer, str(tmp_path / "doc.txt"), seqlen=6, nsamples=3)
    expected = sorted(tiny_tokenizer(p)["input_ids"] for p in paragraphs)
    assert sorted(rows(calib)) == expected  # one paragraph = one document = one sample here


def test_list_input(tiny_tokenizer):
    texts = [words(GREEK, 12, i) for i in range(6)]
    calib = build_calibration_set(tiny_tokenizer, texts, seqlen=12, nsamples=6)
    assert sorted(rows(calib)) == sorted(tiny_tokenizer(t)["input_ids"] for t in texts)
    assert "list of 6 texts" in calib.description


# ------------------------------------------------------------------------------------------ mixing


def test_combined_sources_with_num(tmp_path, tiny_tokenizer):
    (tmp_path / "a.json").write_text(json.dumps([words(GREEK, 5, i) for i in range(10)]))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": words(NUMBERS, 5, i)}) for i in range(10)))
    a, b = tmp_path / "a.json", tmp_path / "b.jsonl"
    greek, numbers = ids_of(tiny_tokenizer, GREEK), ids_of(tiny_tokenizer, NUMBERS)

    calib = build_calibration_set(tiny_tokenizer, f"{a},{b}:num=2", seqlen=4, nsamples=7)
    assert calib.input_ids.shape == (7, 4)
    assert sum(set(r) <= numbers for r in rows(calib)) == 2
    assert sum(set(r) <= greek for r in rows(calib)) == 5

    even = build_calibration_set(tiny_tokenizer, f"{a},{b}", seqlen=4, nsamples=6)
    assert sum(set(r) <= numbers for r in rows(even)) == sum(set(r) <= greek for r in rows(even)) == 3

    both = build_calibration_set(tiny_tokenizer, f"{a}:num=3, {b}:num=2", seqlen=4, nsamples=100)
    assert both.input_ids.shape == (5, 4)
    assert str(a) in both.description and str(b) in both.description


def test_shortfall_of_one_source_is_taken_from_the_other(tmp_path, tiny_tokenizer, caplog):
    (tmp_path / "small.json").write_text(json.dumps([words(NUMBERS, 4)]))  # only one sample's worth
    (tmp_path / "big.json").write_text(json.dumps([words(GREEK, 4, i) for i in range(20)]))
    spec = f"{tmp_path / 'small.json'}:num=3,{tmp_path / 'big.json'}"
    with caplog.at_level(logging.WARNING, logger="auto_round"):
        calib = build_calibration_set(tiny_tokenizer, spec, seqlen=4, nsamples=8)
    assert calib.input_ids.shape == (8, 4)
    assert "ran out of text" in caplog.text


# ------------------------------------------------------------------------------------------ packing


def test_short_texts_are_packed_not_dropped(tiny_tokenizer, caplog):
    texts = [words(GREEK, 3, i) for i in range(10)]  # 30 tokens + 9 eos separators = 39
    with caplog.at_level(logging.INFO, logger="auto_round"):
        calib = build_calibration_set(tiny_tokenizer, texts, seqlen=8, nsamples=100)
    assert calib.input_ids.shape == (5, 8)  # 4 full chunks + 1 partial
    assert int(calib.attention_mask.sum()) == 39
    assert sorted(int(m.sum()) for m in calib.attention_mask) == [7, 8, 8, 8, 8]
    padded = calib.input_ids[calib.attention_mask == 0]
    assert padded.tolist() == [PAD]
    counts = Counter(t for r in rows(calib) for t in r)
    assert counts[EOS] == 9
    expected = Counter(t for text in texts for t in tiny_tokenizer(text)["input_ids"])
    del counts[EOS]
    assert counts == expected  # every token of every text is there
    assert "10 texts packed into 5 chunk(s)" in caplog.text and "1 padded tokens" in caplog.text
    assert "only 5 calibration samples of the 100 requested" in caplog.text


def test_long_texts_truncated_short_ones_packed(tiny_tokenizer, caplog):
    texts = [words(GREEK, 20), words(NUMBERS, 3), words(NUMBERS, 4)]
    with caplog.at_level(logging.INFO, logger="auto_round"):
        calib = build_calibration_set(tiny_tokenizer, texts, seqlen=8, nsamples=10)
    assert calib.input_ids.shape == (2, 8)
    assert sorted(int(m.sum()) for m in calib.attention_mask) == [8, 8]  # 3 + eos + 4 = 8: exact chunk
    assert "1 truncated" in caplog.text


def test_concat_option_splits_long_texts(tmp_path, tiny_tokenizer):
    (tmp_path / "long.json").write_text(json.dumps([words(GREEK, 20, 0), words(GREEK, 20, 3)]))
    calib = build_calibration_set(tiny_tokenizer, f"{tmp_path / 'long.json'}:concat=true", seqlen=8, nsamples=50)
    assert calib.input_ids.shape == (6, 8)
    assert int(calib.attention_mask.sum()) == 41  # 20 + eos + 20, nothing truncated


def test_pad_falls_back_to_eos_then_zero(tiny_tokenizer):
    class NoPad:
        eos_token_id, pad_token_id = 7, None

        def __call__(self, text, **kw):
            return {"input_ids": [5] * len(text.split())}

    calib = build_calibration_set(NoPad(), ["a b c"], seqlen=5, nsamples=1)
    assert calib.input_ids.tolist() == [[5, 5, 5, 7, 7]] and calib.attention_mask.tolist() == [[1, 1, 1, 0, 0]]
    NoPad.eos_token_id = None
    calib = build_calibration_set(NoPad(), ["a b", "c"], seqlen=5, nsamples=1)
    assert calib.input_ids.tolist() == [[5, 5, 5, 0, 0]]  # no eos: no separator, pad 0


def test_packing_with_a_bos_adding_tokenizer(tiny_tokenizer):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = tiny_tokenizer.backend_tokenizer.__class__.from_str(tiny_tokenizer.backend_tokenizer.to_str())
    backend.post_processor = processors.TemplateProcessing(single="<pad> $A", special_tokens=[("<pad>", PAD)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")
    calib = build_calibration_set(tok, [words(GREEK, 2), words(NUMBERS, 2)], seqlen=8, nsamples=1)
    # [bos a b] eos [bos c d] + 1 pad: bos (= pad id here) kept inside the stream, padding masked
    assert calib.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1, 1, 0]]
    assert calib.input_ids[0, :7].tolist().count(PAD) == 2 and calib.input_ids[0, :7].tolist().count(EOS) == 1


# ------------------------------------------------------------------------------------------ shapes, seeds


@pytest.mark.parametrize("seqlen,nsamples", [(1, 1), (4, 3), (16, 2)])
def test_shapes(tiny_tokenizer, seqlen, nsamples):
    texts = [words(GREEK, 40, i) for i in range(10)]
    calib = build_calibration_set(tiny_tokenizer, texts, seqlen=seqlen, nsamples=nsamples)
    assert calib.input_ids.shape == calib.attention_mask.shape == (nsamples, seqlen)


def test_deterministic_for_a_seed(tiny_tokenizer):
    texts = [words(GREEK, 6, i) + " " + words(NUMBERS, i + 1) for i in range(30)]
    state, py_state = torch.random.get_rng_state(), random.getstate()
    one = build_calibration_set(tiny_tokenizer, texts, seqlen=6, nsamples=8, seed=1)
    two = build_calibration_set(tiny_tokenizer, texts, seqlen=6, nsamples=8, seed=1)
    other = build_calibration_set(tiny_tokenizer, texts, seqlen=6, nsamples=8, seed=2)
    assert torch.equal(one.input_ids, two.input_ids) and torch.equal(one.attention_mask, two.attention_mask)
    assert not torch.equal(one.input_ids, other.input_ids)
    assert torch.equal(torch.random.get_rng_state(), state) and random.getstate() == py_state  # global RNGs untouched


# ------------------------------------------------------------------------------------------ errors


def _error_cases(tmp):
    (tmp / "empty.txt").write_text("\n\n   \n")
    (tmp / "blank.json").write_text(json.dumps(["", "  "]))
    (tmp / "notext.json").write_text(json.dumps([{"body": "x"}]))
    (tmp / "broken.jsonl").write_text('{"text": "ok"}\n{not json\n')
    (tmp / "ok.json").write_text(json.dumps(["alpha beta"]))
    return [
        (str(tmp / "missing.json"), {}, "not found"),
        (str(tmp / "empty.txt"), {}, "no usable text"),
        (str(tmp / "blank.json"), {}, "no usable text"),
        (str(tmp / "notext.json"), {}, '"text" field'),
        (str(tmp / "broken.jsonl"), {}, "line 2 is not valid JSON"),
        ([], {}, "empty list"),
        (["", " \n"], {}, "no usable text"),
        ([1, 2], {}, "only strings"),
        (" , ", {}, "names no dataset"),
        (42, {}, "unsupported dataset type"),
        (["alpha"], {"nsamples": 0}, "nsamples"),
        (["alpha"], {"seqlen": 0}, "seqlen"),
        (str(tmp / "ok.json") + ":foo=1", {}, "unknown option key 'foo'"),
        (str(tmp / "ok.json") + ":num=x", {}, "num='x' must be a positive integer"),
        (str(tmp / "ok.json") + ":concat=maybe", {}, "must be true or false"),
    ]


def test_error_cases(tmp_path, tiny_tokenizer):
    for dataset, kwargs, message in _error_cases(tmp_path):
        with pytest.raises(CalibrationDataError) as info:
            build_calibration_set(tiny_tokenizer, dataset, **{"seqlen": 4, "nsamples": 2, **kwargs})
        assert message in str(info.value), (dataset, str(info.value))
        assert isinstance(info.value, ValueError)


def test_zero_tokens_error(tiny_tokenizer):
    class Empty:
        eos_token_id = pad_token_id = None

        def __call__(self, text, **kw):
            return {"input_ids": []}

    with pytest.raises(CalibrationDataError, match="zero tokens"):
        build_calibration_set(Empty(), ["some text"], seqlen=4, nsamples=2)


def test_named_hub_dataset_unreachable(tiny_tokenizer, hub_down):
    with pytest.raises(CalibrationDataError) as info:
        build_calibration_set(tiny_tokenizer, "someone/some-dataset", seqlen=4, nsamples=2)
    msg = str(info.value)
    assert "unreachable" in msg and ".txt/.json/.jsonl" in msg and "list of strings" in msg and "unset" in msg


def test_hub_errors_other_than_connection(tiny_tokenizer, monkeypatch):
    def missing(name, split):
        raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub or cannot be accessed.")

    monkeypatch.setattr(calib_data, "_load_hub_dataset", missing)
    with pytest.raises(CalibrationDataError, match="could not be loaded: Dataset 'org/nope' doesn't exist"):
        build_calibration_set(tiny_tokenizer, "org/nope", seqlen=4, nsamples=2)
    try:
        try:
            raise OSError("[Errno -2] Name or service not known")
        except OSError as inner:
            raise RuntimeError("request failed") from inner
    except RuntimeError as outer:
        assert calib_data._is_connection_error(outer)
    assert not calib_data._is_connection_error(ValueError("bad config"))


def test_hub_dataset_path(tiny_tokenizer, monkeypatch):
    datasets = pytest.importorskip("datasets")
    seen = {}

    def fake_load(name, split):
        seen.update(name=name, split=split)
        texts = [words(GREEK, 9, i) for i in range(12)] + [None, ""]  # empty rows are skipped
        return datasets.Dataset.from_dict({"text": texts, "meta": list(range(14))})

    monkeypatch.setattr(calib_data, "_load_hub_dataset", fake_load)
    calib = build_calibration_set(tiny_tokenizer, None, seqlen=9, nsamples=4)
    assert seen == {"name": "NeelNanda/pile-10k", "split": "train"}
    assert calib.input_ids.shape == (4, 9) and "NeelNanda/pile-10k" in calib.description
    build_calibration_set(tiny_tokenizer, "org/data:split=validation", seqlen=9, nsamples=4)
    assert seen == {"name": "org/data", "split": "validation"}


# ------------------------------------------------------------------------------------------ offline text


def test_offline_fallback_when_hub_unreachable(tiny_tokenizer, hub_down, bundled_from_session_cache, caplog):
    with caplog.at_level(logging.WARNING, logger="auto_round"):
        calib = build_calibration_set(tiny_tokenizer, None, seqlen=64, nsamples=6, seed=3)
    assert "falling back to the bundled offline" in caplog.text
    assert "offline-wikipedia" in calib.description
    assert calib.input_ids.shape == (6, 64) and calib.attention_mask.all()
    explicit = build_calibration_set(tiny_tokenizer, "offline-wikipedia", seqlen=64, nsamples=6, seed=3)
    assert torch.equal(calib.input_ids, explicit.input_ids)


def test_heldout_split_does_not_overlap_calibration(wiki_cache):
    articles = offline_text.wikipedia_articles(wiki_cache)
    calib, heldout = offline_text.calibration_texts(wiki_cache), offline_text.heldout_texts(wiki_cache)
    assert len(articles) == 107 and len(calib) == 80 and len(heldout) == 26  # article 89 is empty
    assert not set(calib) & set(heldout)
    assert calib == [b for _, b in articles[:80]] and set(heldout) == {b for _, b in articles[80:] if b}
    titles = [t for t, _ in articles]
    assert len(set(titles)) == 107 and titles[0] == "Anarchism"
    assert all(len(t) > 300 for t in calib + heldout)


def test_wiki_cache_is_written_atomically(wiki_cache):
    files = sorted(p.name for p in wiki_cache.iterdir())
    assert files == [offline_text.CACHE_NAME]  # no temp file left behind
    data = json.loads((wiki_cache / offline_text.CACHE_NAME).read_text(encoding="utf-8"))
    assert len(data["articles"]) == 107


def test_missing_gensim_gives_install_hint(tmp_path, wiki_cache, monkeypatch):
    monkeypatch.setattr(offline_text.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(offline_text.OfflineTextError, match=r"pip install gensim==4\.4\.0"):
        offline_text.wikipedia_articles(tmp_path / "empty")
    copy = tmp_path / "copy"  # a previous extraction is still used without gensim
    copy.mkdir()
    (copy / offline_text.CACHE_NAME).write_bytes((wiki_cache / offline_text.CACHE_NAME).read_bytes())
    assert len(offline_text.wikipedia_articles(copy)) == 107


def test_bundled_text_takes_one_article_per_sample_then_packs_tails(tmp_path):
    """Default offline data: diverse samples (one per article) while articles last, tails packed after."""
    pytest.importorskip("gensim")
    from tiny_models import tiny_tokenizer

    tok = tiny_tokenizer()  # byte-level: every article is far longer than 64 tokens
    few = build_calibration_set(tok, "offline-wikipedia", seqlen=64, nsamples=16, seed=1)
    assert few.input_ids.shape == (16, 64)
    starts = {tuple(row[:32].tolist()) for row in few.input_ids}
    assert len(starts) == 16  # 16 different article openings, not 16 slices of one article
    many = build_calibration_set(tok, "offline-wikipedia", seqlen=64, nsamples=120, seed=1)
    assert many.input_ids.shape == (120, 64) and int(many.attention_mask.sum()) == 120 * 64


# ------------------------------------------------------------------------------------------ the reference's spec forms


def test_bare_split_and_several_splits_as_in_the_reference_docs(tiny_tokenizer, monkeypatch):
    datasets = pytest.importorskip("datasets")
    seen = []
    monkeypatch.setattr(calib_data, "_load_hub_dataset", lambda name, split: seen.append((name, split)) or
                        datasets.Dataset.from_dict({"text": [words(GREEK, 9, i) for i in range(12)]}))
    build_calibration_set(tiny_tokenizer, "NeelNanda/pile-10k:train,mbpp:train+validation+test:num=2", seqlen=9,
                          nsamples=4)
    assert seen == [("NeelNanda/pile-10k", "train"), ("mbpp", "train+validation+test")]
    with pytest.raises(CalibrationDataError, match="unknown option key 'bogus'"):
        build_calibration_set(tiny_tokenizer, "org/data:bogus=1", seqlen=9, nsamples=4)


def test_apply_chat_template_wraps_each_text_in_the_template(tmp_path, tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if m.role == 'system' %}alpha {% else %}beta {% endif %}"
                         "{{ m.content }} {% endfor %}{% if add_generation_prompt %}gamma{% endif %}")
    path = tmp_path / "t.txt"
    path.write_text(words(NUMBERS, 4) + "\n\n" + words(NUMBERS, 4, 4))
    calib = build_calibration_set(tok, f"{path}:apply_chat_template:system_prompt=delta: epsilon", seqlen=64,
                                  nsamples=1)
    text = tok.decode(rows(calib)[0])
    # the system turn (its colon included), the user turn, the generation prompt, per text; texts packed
    assert text.startswith("alpha delta") and "epsilon beta one two three four gamma" in text.replace("<unk> ", "")
    assert text.count("gamma") == 2
    with pytest.raises(CalibrationDataError, match="system_prompt needs apply_chat_template"):
        build_calibration_set(tok, f"{path}:system_prompt=x", seqlen=64, nsamples=1)
    with pytest.raises(CalibrationDataError, match="no chat template"):
        build_calibration_set(tiny_tokenizer, f"{path}:apply_chat_template", seqlen=64, nsamples=1)
