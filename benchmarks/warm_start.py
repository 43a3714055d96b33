"""Benchmark: a study warm-started from other tasks' studies against a cold one.

Each task is an image source: ``digits``, ``synthetic:SEED:CLASSES`` (autofinetune's generated
images, another pattern per seed) or an image folder. The first ``--data`` task is the target,
the others the earlier tasks. One study per earlier task runs first (``--source-trials`` trials
each, into one SQLite file); then, for each ``--seeds`` seed, the target is searched twice with
the same trial budget: cold, and with ``search.warm_start`` naming the earlier studies (their
best configurations run after the baseline, and TPE starts from their trials).

It prints, per seed and as the median over seeds, each target study's final best validation
value, and the trials and seconds the warm study needed to reach the cold study's final best
(``-`` where it never did).

    python benchmarks/warm_start.py --quick                      # ~4 min on 2 CPU cores
    python benchmarks/warm_start.py --data digits synthetic:1:10 synthetic:2:10 --trials 20 --seeds 3
    python benchmarks/warm_start.py --data my_images other_images --backbone resnet50 --weights imagenet
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package

from autofinetune.viewing.report import format_table  # noqa: E402

QUICK_TASKS = ["synthetic:0:4", "synthetic:1:3", "synthetic:2:5"]


def task_fields(task: str) -> dict[str, Any]:
    """The spec fields of one task: its data source (and, for ``synthetic:SEED:CLASSES``, the seed)."""
    if task.startswith("synthetic"):
        _, seed, classes = (task.split(":") + ["0", "3"])[:3]
        return {"seed": int(seed), "data": {"source": "synthetic", "synthetic_classes": int(classes),
                                             "synthetic_images_per_class": 40}}
    return {"data": {"source": task if task == "digits" else str(Path(task).resolve())}}


def spec_for(name: str, task: str, args: argparse.Namespace, *, trials: int, seed: int | None = None,
             warm_start: list[str] | None = None) -> dict[str, Any]:
    fields = task_fields(task)
    data = {"image_size": args.image_size, "validation_split": 0.25, "batch_size": 32, **fields["data"]}
    if args.max_per_class:
        data["max_images_per_class"] = args.max_per_class
    return {
        "name": name, "seed": fields.get("seed", 0) if seed is None else seed, "data": data,
        "backbone": {"name": args.backbone, "weights": args.weights},
        "schedule": {"phase1_epochs": args.epochs, "phase2_epochs": args.epochs},
        "search": {
            "n_trials": trials, "pruner": "none", "warm_start": warm_start or [],
            "head_units": [16, 32, 64, 128], "unfreeze_depth": {"low": 0, "high": 4},
            "phase1_lr": {"low": 1e-4, "high": 3e-2, "log": True}, "phase2_lr": {"low": 1e-5, "high": 3e-3, "log": True},
        },
    }


def run_study(spec: dict[str, Any], url: str) -> dict[str, Any]:
    """Launch one study; its trials' values and end times (seconds from the first start)."""
    import autofinetune

    started = time.perf_counter()
    study = autofinetune.launch(spec, storage=url, progress=False)
    wall = time.perf_counter() - started
    done = [t for t in study.get_trials() if t.value is not None and t.datetime_complete is not None]
    start = min(t.datetime_start for t in study.get_trials() if t.datetime_start is not None)
    trials = [{"number": t.number, "value": t.value, "end_s": (t.datetime_complete - start).total_seconds(),
               "warm": "warm_start_from" in t.user_attrs} for t in sorted(done, key=lambda t: t.number)]
    return {"trials": trials, "best": max((t["value"] for t in trials), default=None), "wall_s": wall}


def reached(run: dict[str, Any], target: float) -> tuple[int | None, float | None]:
    """``(trials, seconds)`` until the run's best-so-far first reached ``target``; ``None`` if never."""
    for count, trial in enumerate(run["trials"], start=1):
        if trial["value"] >= target:
            return count, trial["end_s"]
    return None, None


def compare(cold: dict[str, Any], warm: dict[str, Any]) -> dict[str, Any]:
    target = cold["best"]
    return {"cold_best": target, "warm_best": warm["best"], "cold_to_best": reached(cold, target),
            "warm_to_best": reached(warm, target)}


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def table(rows: list[dict[str, Any]]) -> str:
    headers = ["seed", "cold best val", "warm best val", "cold: trials / s to its best",
               "warm: trials / s to cold's best"]

    def pair(value: tuple[int | None, float | None]) -> str:
        return "-" if value[0] is None else f"{value[0]} / {value[1]:.0f}"

    lines = [[row["seed"], f"{row['cold_best']:.3f}", f"{row['warm_best']:.3f}", pair(row["cold_to_best"]),
              pair(row["warm_to_best"])] for row in rows]
    lines.append([
        "median", f"{_median([r['cold_best'] for r in rows]):.3f}", f"{_median([r['warm_best'] for r in rows]):.3f}",
        pair((_median([r["cold_to_best"][0] for r in rows]), _median([r["cold_to_best"][1] for r in rows]))),
        pair((_median([r["warm_to_best"][0] for r in rows]), _median([r["warm_to_best"][1] for r in rows]))),
    ])
    return format_table(headers, lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=None, help="tasks: the target first (default: --quick's)")
    parser.add_argument("--trials", type=int, default=12, help="trials of each target study")
    parser.add_argument("--source-trials", type=int, default=12, help="trials of each earlier task's study")
    parser.add_argument("--seeds", type=int, default=2, help="cold/warm pairs of the target, one per seed")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each phase")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--max-per-class", type=int, default=None)
    parser.add_argument("--backbone", default="tiny_resnet")
    parser.add_argument("--weights", default="none")
    parser.add_argument("--quick", action="store_true", help="synthetic tasks, tiny backbone, 8 trials, 16 px")
    parser.add_argument("--json", type=Path, help="write the runs and the summary here")
    args = parser.parse_args(argv)
    if args.quick:
        args.trials, args.source_trials, args.epochs, args.image_size = 8, 8, 1, 16
    tasks = args.data or QUICK_TASKS
    if len(tasks) < 2:
        parser.error("--data: give the target task and at least one earlier task")
    folder = Path(tempfile.mkdtemp(prefix="warm-start-bench-"))
    url = f"sqlite:///{folder / 'studies.db'}"
    sources = []
    for index, task in enumerate(tasks[1:]):
        name = f"earlier-{index}"
        run = run_study(spec_for(name, task, args, trials=args.source_trials), url)
        print(f"earlier study {name} ({task}): best {run['best']:.3f} in {run['wall_s']:.0f} s", flush=True)
        sources.append(name)
    rows, runs = [], []
    for seed in range(args.seeds):
        cold = run_study(spec_for(f"cold-{seed}", tasks[0], args, trials=args.trials, seed=seed), url)
        warm = run_study(spec_for(f"warm-{seed}", tasks[0], args, trials=args.trials, seed=seed, warm_start=sources), url)
        rows.append({"seed": seed, **compare(cold, warm)})
        runs.append({"seed": seed, "cold": cold, "warm": warm})
        print(f"seed {seed}: cold best {cold['best']:.3f} ({cold['wall_s']:.0f} s), warm best {warm['best']:.3f} "
              f"({warm['wall_s']:.0f} s)", flush=True)
    print(f"\nTarget {tasks[0]}, warm-started from {', '.join(tasks[1:])}; {args.trials} trials each, "
          f"{args.backbone}, {args.epochs}+{args.epochs} epochs, {args.image_size} px:")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"tasks": tasks, "rows": rows, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
