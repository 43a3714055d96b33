"""``search_quality.py --suite``: the search-quality comparison on every task of ``tasks.py``.

Each task (rendered once, cached) runs the same comparison in turn, with its own workdir and
JSON; at the end one table shows, per task and search, the median and spread over seeds of the
final best validation and test accuracy and the median time to keras-tuner Hyperband's final best.

In suite mode ``--json DIR``, ``--plot DIR`` and ``--reference DIR`` are folders: each task
writes ``DIR/TASK.json`` (and ``DIR/suite.json`` the suite's summary) and ``DIR/TASK.png``, and
reads its earlier anchors from ``REFERENCE/TASK.json``: the anchors run once per task and seed.

``--warm-start-from DIR`` (an earlier suite's ``--workdir``) adds ``autofinetune [warm start]``
on each task: its seed N names, in ``search.warm_start``, the seed-N autofinetune study of every
other task found in ``DIR``. It runs beside a cold autofinetune, and a last table says when the
warm study reached the cold one's final best.

    python benchmarks/search_quality.py --suite --quick --json suite-quick/
    python benchmarks/search_quality.py --suite --tasks digits shapes --searches autofinetune \\
        --reference anchors/ --json ours/
    python benchmarks/search_quality.py --tasks glyphs --searches autofinetune --workdir sources/   # then
    python benchmarks/search_quality.py --tasks shapes --searches autofinetune --warm-start-from sources/
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path
from typing import Callable

from autofinetune.viewing.report import format_table
from quality_warm_start import print_suite_warm_start, warm_start_sources
from search_quality import TARGET, fmt, spread
from tasks import TASKS, task_folder

#: The seed each task is rendered with: the task stays fixed while the searches' seeds vary.
TASK_SEED = 0


def task_args(args: argparse.Namespace, name: str, workdir: Path) -> argparse.Namespace:
    """The comparison's arguments for one task: its folder, workdir, JSON, plot and reference."""
    one = copy.copy(args)
    one.task = name
    one.data = task_folder(name, args.image_size, TASK_SEED)
    one.workdir = workdir / name
    one.json = (args.json or workdir) / f"{name}.json"
    one.plot = args.plot / f"{name}.png" if args.plot else None
    one.reference = None
    if args.reference:
        one.reference = args.reference / f"{name}.json"
        if not one.reference.is_file():
            raise SystemExit(f"--reference {args.reference}: no {name}.json there (the anchors of task {name!r})")
    one.warm_start = warm_start_sources(args.warm_start_from, name, args.seeds) if args.warm_start_from else None
    return one


def suite_rows(documents: dict[str, dict]) -> list[list[str]]:
    """One row per task and search: final val, final test (median [min-max]), time to target, trials."""
    rows = []
    for task, document in documents.items():
        for search, runs in document["runs"].items():
            entry = document["searches"][search]
            reached = entry["time_to_target_s"]
            rows.append([task, TASKS[task].role, search, spread([run["final_val"] for run in runs]),
                         spread([run["final_test"] for run in runs]),
                         "not reached" if reached is None else f"{reached:.0f} s", fmt(entry["trials_counted"], 0)])
    return rows


def print_suite(documents: dict[str, dict], seeds: int) -> None:
    header = ["task", "role", "search", "final val", "final test", f"time to {TARGET}'s final val", "trials"]
    print(f"\nsuite: final best per task (median [min-max] over {seeds} seed(s); time to target: median over seeds)")
    print(format_table(header, suite_rows(documents)))


def run_suite(args: argparse.Namespace, compare: Callable[[argparse.Namespace], dict]) -> int:
    """Run ``compare`` on each task (``--tasks`` or all), then print and write the suite table."""
    names = args.tasks or list(TASKS)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="search-quality-suite-"))
    for folder in (workdir, args.json, args.plot):
        if folder:
            folder.mkdir(parents=True, exist_ok=True)
    # Every reference is checked before any search runs: a missing one should not cost hours.
    per_task = {name: task_args(args, name, workdir) for name in names}
    documents = {}
    for name, one in per_task.items():
        print(f"\n=== task {name} ({TASKS[name].role}): {TASKS[name].description}", flush=True)
        documents[name] = compare(one)
    print_suite(documents, args.seeds)
    print_suite_warm_start(documents)
    if args.json:
        suite = {name: {"role": TASKS[name].role, "searches": doc["searches"], "settings": doc["settings"],
                        **({"warm_start": doc["warm_start"]} if "warm_start" in doc else {})}
                 for name, doc in documents.items()}
        (args.json / "suite.json").write_text(json.dumps({"target": TARGET, "tasks": suite}, indent=1))
        print(f"json: {args.json / 'suite.json'}")
    return 0
