"""Any lm-evaluation-harness task as a gpt2lab eval task: `gpt2lab eval lm-eval --tasks a,b` and
`eval.tasks: [lm-eval:arc_easy]` during training, a front over lm-eval's `simple_evaluate` with the
model wrapped in `harness.HarnessLM` (no export, any architecture, LoRA adapters unmerged).

    gpt2lab eval lm-eval --init out/run --tasks arc_easy,piqa --limit 100 --num-fewshot 0
    gpt2lab eval lm-eval --init out/run --tasks hellaswag_local --include-path lm_tasks  # offline

Task names are checked against lm-eval's index before the model loads (an unknown one gets close
names suggested), and each task's data is fetched before any scoring: a task whose data cannot be
fetched (no network) is one line naming it and how to point it at local files. `write_local_tasks`
writes such local task YAMLs (`dataset_path: json` + `data_files`) for the shared data folder's
HellaSwag, LAMBADA and WikiText-2.

Declarations import without torch or lm_eval (`gpt2lab eval --help` lists this task); lm-eval is the
optional extra `gpt2lab[eval]`.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpt2lab.errors import UserError
from gpt2lab.evaluate import shared_data_dir
from gpt2lab.evaluate.task import EvalTask, MetricRow, positive_int

PREFIX = "lm-eval:"
"""eval.tasks names an lm-eval task as lm-eval:TASK."""
INSTALL = 'lm-eval is not installed; install it with: pip install "gpt2lab[eval]"'
BOOTSTRAP_ITERS = 1000
"""Bootstrap resamples for the standard errors lm-eval cannot compute in closed form (perplexities)."""
LOCAL_FIX = ("offline, write a task YAML with `dataset_path: json` and `dataset_kwargs: {data_files: {test: FILE}}` "
             "into a folder and pass it with --include-path FOLDER (docs/evaluation.md)")


def require_lm_eval() -> None:
    """A one-line UserError when lm-eval is not installed."""
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError(INSTALL)


def batch_size_arg(text: str) -> int | None:
    """An argparse `type` for --batch-size: a positive number, or auto (None: the backend's default)."""
    return None if text == "auto" else positive_int(text)


# --------------------------------------------------------------------------------------------------
# Tasks: names checked, data fetched, then evaluated


def task_manager(include_path: Sequence[str] = (), defaults: bool = True) -> Any:
    """lm-eval's TaskManager over its own tasks (unless not `defaults`: tasks named by YAML paths need
    no index) and the folders of `include_path` (each must exist). Built once per process and setting:
    indexing lm-eval's thousands of task YAMLs takes seconds."""
    require_lm_eval()
    for folder in include_path:
        if not Path(folder).exists():
            raise UserError(f"--include-path {folder} does not exist; pass a folder of lm-eval task YAMLs")
    return _task_manager(tuple(str(Path(f).resolve()) for f in include_path), defaults)


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: tuple[str, ...], defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_path) or None, include_defaults=defaults)


def manager_for(names: Sequence[str], include_path: Sequence[str] = ()) -> Any:
    """The TaskManager that resolves `names`: without lm-eval's index when every name is a YAML file."""
    return task_manager(include_path, defaults=not all(Path(n).is_file() for n in names) or not names)


def check_task_names(names: Sequence[str], manager: Any) -> None:
    """A UserError for the first name that is not an lm-eval task, group or tag, suggesting close ones."""
    if not names:
        raise UserError("--tasks is empty; name lm-eval tasks, e.g. --tasks hellaswag,arc_easy")
    known = manager.all_tasks
    for name in names:
        if name not in known and not Path(name).is_file():
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
            raise UserError(f"'{name}' is not an lm-eval task; {hint}`lm_eval ls tasks` lists them "
                            "(a local task's folder goes to --include-path)")


def fetch_task_data(names: Sequence[str], manager: Any) -> None:
    """Load each task (its dataset fetched into the datasets cache); a task that cannot is one line."""
    for name in names:
        try:
            manager.load([name])
        except UserError:
            raise
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise UserError(f"lm-eval task '{name}': its data could not be loaded ({type(e).__name__}: {first}); "
                            f"{LOCAL_FIX}") from None


def evaluate(lm: Any, names: Sequence[str], manager: Any, limit: int | None = None,
             num_fewshot: int | None = None, bootstrap_iters: int = BOOTSTRAP_ITERS) -> dict[str, Any]:
    """lm-eval's results of `lm` on the tasks `names` (checked and fetched first):
    {"results": {task: {metric: value, metric_stderr: value}}, "n": {task: documents}, "versions": ...}."""
    import lm_eval

    check_task_names(names, manager)
    fetch_task_data(names, manager)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(names), num_fewshot=num_fewshot, limit=limit,
                                  task_manager=manager, bootstrap_iters=bootstrap_iters, log_samples=False)
    results: dict[str, dict[str, float]] = {}
    for task, metrics in out["results"].items():
        row = {}
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if filter_name and isinstance(value, (int, float)):
                row[metric if filter_name == "none" else f"{metric},{filter_name}"] = float(value)
        results[task] = row
    n = {task: int(s.get("effective", s.get("original", 0))) for task, s in out.get("n-samples", {}).items()}
    return {"results": results, "n": n, "versions": {k: str(v) for k, v in out.get("versions", {}).items()}}


def flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    """{"task/metric": value} of `evaluate`'s result, standard errors left out."""
    return {f"{task}/{metric}": value for task, metrics in result["results"].items()
            for metric, value in metrics.items() if not metric.split(",")[0].endswith("_stderr")}


# --------------------------------------------------------------------------------------------------
# The eval task


class LmEval(EvalTask):
    """`gpt2lab eval lm-eval` (tasks from --tasks) and `lm-eval:TASK` in eval.tasks (one task)."""

    description = "any lm-evaluation-harness task (ARC, PIQA, MMLU, ...), scored by gpt2lab's own model"
    data_help = "lm-eval task names, comma-separated"
    unit = None  # --limit is lm-eval's (documents per task), added below
    batch_unit = "(context, continuation) pairs"
    default_batch_size = 32

    def __init__(self, tasks: str | None = None) -> None:
        self.tasks = tasks
        self.name = f"{PREFIX}{tasks}" if tasks else "lm-eval"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        # --tasks is the task's "data": commands/eval resolves and loads it before the model loads.
        parser.add_argument("--tasks", dest="data", required=True, metavar="A,B",
                            help="lm-eval task (or group) names, comma-separated, e.g. hellaswag,arc_easy")
        parser.add_argument("--limit", type=positive_int, metavar="N", help="only the first N documents of each task")
        parser.add_argument("--batch-size", type=batch_size_arg, default=self.default_batch_size, metavar="N|auto",
                            help=f"{self.batch_unit} per forward pass (default: {self.default_batch_size}; auto = the default)")
        self.add_options(parser)

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--num-fewshot", type=int, metavar="K", help="few-shot examples (default: the task's)")
        parser.add_argument("--include-path", action="append", default=[], metavar="FOLDER",
                            help="a folder of local lm-eval task YAMLs (repeatable), e.g. for offline data")

    def has_default_data(self) -> bool:
        return self.tasks is not None

    def find_data(self, download: bool = True) -> Path | None:
        return Path(self.tasks) if self.tasks else None

    def resolve_data(self, path: str | Path | None, download: bool = True) -> Path:
        text = str(path if path is not None else self.tasks or "")
        require_lm_eval()
        if not [t for t in text.split(",") if t.strip()]:
            raise UserError("--tasks is empty; name lm-eval tasks, e.g. --tasks hellaswag,arc_easy")
        return Path(text)

    def load(self, path: Path, options: argparse.Namespace) -> list[str]:
        """The task names, checked and their data fetched (before the model loads)."""
        names = [t.strip() for t in str(path).split(",") if t.strip()]
        manager = manager_for(names, getattr(options, "include_path", []))
        check_task_names(names, manager)
        fetch_task_data(names, manager)
        self._manager = manager
        return names

    def run(self, model: Any, tokenizer: Any, examples: Sequence, options: argparse.Namespace, env: Any = None,
            batch_size: int | None = None, show_progress: bool = False) -> dict:
        import logging

        from gpt2lab.evaluate.harness import HarnessLM

        logging.getLogger("lm_eval").setLevel(logging.ERROR)  # the table below says what matters

        if env is not None and env.world_size > 1:
            raise UserError("lm-eval tasks run in one process; start `gpt2lab eval lm-eval` without torchrun")
        manager = getattr(self, "_manager", None) or manager_for(list(examples), getattr(options, "include_path", []))
        lm = HarnessLM(model, tokenizer, batch_size=batch_size or self.default_batch_size)
        result = evaluate(lm, list(examples), manager, limit=getattr(options, "limit", None),
                          num_fewshot=getattr(options, "num_fewshot", None))
        return {**result, **flat_metrics(result)}

    def training_values(self, result: dict[str, Any]) -> dict[str, float]:
        """metric -> value for one task (logged as eval/lm-eval:TASK/metric), else subtask/metric -> value."""
        flat = flat_metrics(result)
        if len(result["results"]) == 1:
            return {key.split("/", 1)[1]: value for key, value in flat.items()}
        return flat

    def rows(self, result: dict) -> list[MetricRow]:
        rows = []
        for task, metrics in result["results"].items():
            for metric, value in metrics.items():
                if metric.split(",")[0].endswith("_stderr"):
                    continue
                stderr = metrics.get(metric.replace(",", "_stderr,", 1) if "," in metric else f"{metric}_stderr")
                text = f"{value:.4f}" + (f" ± {stderr:.4f}" if isinstance(stderr, float) else "")
                rows.append(MetricRow(f"{task}/{metric}", text, f"{result['n'].get(task, '?')} documents"))
        return rows


TASK = LmEval()


# --------------------------------------------------------------------------------------------------
# Local task YAMLs over the shared data folder


def write_local_tasks(folder: str | Path, data_dir: str | Path | None = None, limit: int | None = None) -> list[str]:
    """Write lm-eval task YAMLs `hellaswag_local`, `lambada_openai_local` and `wikitext_local` into
    `folder` over the files of the shared data folder (`data_dir`, default $GPT2LAB_SHARED_DATA), so
    lm-eval runs them offline with --include-path `folder`; returns the task names.

    lambada_openai_local and wikitext_local include lm-eval's own task YAMLs and replace only the
    dataset (same prompts and metrics); hellaswag_local reads the llama.cpp-format HellaSwag file
    with gpt2lab's parser (its contexts have no ctx_a/ctx_b for lm-eval's preprocessing): each ending
    scored after " ", acc and acc_norm as lm-eval's hellaswag. `limit`: only the first N documents of
    each (smaller files to convert, for tests)."""
    require_lm_eval()
    import lm_eval

    from gpt2lab.evaluate import hellaswag, lambada, wikitext
    from gpt2lab.fileio import read_text

    data = Path(data_dir) if data_dir is not None else shared_data_dir()
    if data is None:
        raise UserError("no shared data folder; set GPT2LAB_SHARED_DATA or pass data_dir")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    builtin = Path(lm_eval.__file__).parent / "tasks"
    records = [{"query": t.context, "choices": list(t.endings), "label": t.label}
               for t in hellaswag.load_tasks(data / hellaswag.SHARED_FILE)[:limit]]
    _write_jsonl(folder / "hellaswag_local.jsonl", records)
    pages = wikitext.read_pages(data / wikitext.SHARED_FILE)[:limit]
    _write_jsonl(folder / "wikitext_local.jsonl", [{"page": p} for p in pages])
    lambada_file = data / lambada.SHARED_FILE
    if limit is not None:
        lambada_file = folder / "lambada_openai_local.jsonl"
        lines = [line for line in read_text(data / lambada.SHARED_FILE).splitlines() if line.strip()]
        lambada_file.write_text("".join(line + "\n" for line in lines[:limit]), encoding="utf-8")

    def data_files(path: Path) -> str:
        return f"dataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(path))}\n"

    (folder / "hellaswag_local.yaml").write_text(
        "task: hellaswag_local\n" + data_files((folder / "hellaswag_local.jsonl").resolve())
        + "output_type: multiple_choice\ntest_split: test\ndoc_to_text: \"{{query}}\"\ndoc_to_target: \"{{label}}\"\n"
        "doc_to_choice: \"choices\"\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n",
        encoding="utf-8")
    (folder / "lambada_openai_local.yaml").write_text(
        f"include: {json.dumps(str(builtin / 'lambada' / 'lambada_openai.yaml'))}\ntask: lambada_openai_local\ntag: []\n"
        + data_files(lambada_file.resolve()), encoding="utf-8")
    (folder / "wikitext_local.yaml").write_text(
        f"include: {json.dumps(str(builtin / 'wikitext' / 'wikitext.yaml'))}\ntask: wikitext_local\n"
        "training_split: null\nvalidation_split: null\n" + data_files((folder / "wikitext_local.jsonl").resolve()),
        encoding="utf-8")
    return ["hellaswag_local", "lambada_openai_local", "wikitext_local"]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
