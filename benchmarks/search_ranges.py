"""Benchmark: where in the search space the good trials lie, to choose the default ranges.

Runs ``autofinetune launch`` on the search-quality benchmark's data (the same folder, split and
pretrained backbone as ``search_quality.py``) with a random sampler and no pruner over a space
wider than the defaults, so every trial trains all its epochs and each parameter's values are
spread evenly. It then prints, per parameter, the trials in each bin of its values: how many,
their median and best validation accuracy, and how many of the top quarter of all trials fall
there; and the range each parameter spans among that top quarter, beside the default range.

    python benchmarks/search_ranges.py                    # 48 trials (36 took 6 minutes on 2 cores)
    python benchmarks/search_ranges.py --trials 96 --seed 1 --json ranges.json
    python benchmarks/search_ranges.py --task textures    # another tuning task of the suite

Defaults are chosen on the suite's tuning tasks only: ``--task`` refuses an evaluation task.

A random search over a few parameters is noisy: read the bins, not single trials.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS.parent))  # this checkout's package
sys.path.insert(0, str(BENCHMARKS))

from autofinetune.spec.sections import SearchSpec  # noqa: E402
from autofinetune.viewing.report import format_table  # noqa: E402
from quality_searches import autofinetune_cli  # noqa: E402
from quality_spec import spec_dict, spec_toml  # noqa: E402
from search_quality import default_digits_folder, resolve_weights, split_folder  # noqa: E402
from tasks import TASKS, task_folder  # noqa: E402

#: The scanned space: a decade beyond the seed recipe's learning-rate ranges on each side, every
#: unfreeze depth of the default range, and the full momentum ranges the parameters allow.
SCAN_SPACE = {
    "head_units": [128, 256, 512, 1024],
    "unfreeze_depth": {"low": 0, "high": 6},
    "phase1_lr": {"low": 1e-5, "high": 1e-1, "log": True},
    "phase1_momentum": {"low": 0.0, "high": 0.95},
    "phase2_lr": {"low": 1e-6, "high": 1e-2, "log": True},
    "phase2_momentum": {"low": 0.0, "high": 0.99},
}


def bins_of(name: str, space: dict | list) -> list[tuple[str, float, float]]:
    """``(label, low, high)`` bins of a parameter: half decades on a log range, one bin per value
    of a list or an integer range, quarters of a linear range (the last bin includes ``high``)."""
    if isinstance(space, list):
        return [(str(value), value, value) for value in space]
    low, high = space["low"], space["high"]
    if isinstance(low, int) and isinstance(high, int):
        return [(str(value), value, value) for value in range(low, high + 1)]
    if space.get("log"):
        edges = [10 ** (math.log10(low) + 0.5 * i) for i in range(round(2 * math.log10(high / low)) + 1)]
        return [(f"{a:.0e}-{b:.0e}", a, b) for a, b in zip(edges, edges[1:])]
    edges = [low + (high - low) * i / 4 for i in range(5)]
    return [(f"{a:.2f}-{b:.2f}", a, b) for a, b in zip(edges, edges[1:])]


def in_bin(value: float, low: float, high: float, last: bool) -> bool:
    return low <= value <= high if (last or low == high) else low <= value < high


def top_quarter(trials: list[dict]) -> list[dict]:
    ranked = sorted(trials, key=lambda trial: trial["val"], reverse=True)
    return ranked[: max(1, len(ranked) // 4)]


def parameter_table(name: str, trials: list[dict]) -> tuple[list[str], list[list[str]]]:
    """One row per bin of ``name``: trials, median and best val, trials of the top quarter."""
    best = {id(trial) for trial in top_quarter(trials)}
    bins = bins_of(name, SCAN_SPACE[name])
    rows = []
    for index, (label, low, high) in enumerate(bins):
        inside = [t for t in trials if in_bin(t["params"][name], low, high, index == len(bins) - 1)]
        values = [t["val"] for t in inside]
        rows.append([label, str(len(inside)), f"{statistics.median(values):.3f}" if values else "-",
                     f"{max(values):.3f}" if values else "-", str(sum(id(t) in best for t in inside))])
    return [name, "trials", "median val", "best val", "in top 25%"], rows


def default_range(name: str) -> str:
    param = getattr(SearchSpec(), name)
    if hasattr(param, "choices"):
        return ", ".join(str(choice) for choice in param.choices)
    return f"{param.low:g} - {param.high:g}" + (" (log)" if param.log else "")


def run_scan(args) -> list[dict]:
    """Launch the random study and return its complete trials: ``{"params", "val"}``."""
    import optuna

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="search-ranges-"))
    workdir.mkdir(parents=True, exist_ok=True)
    weights = resolve_weights(args)
    if args.task:
        data = task_folder(args.task, args.image_size)
    else:
        data = args.data or default_digits_folder(args.image_size)
    trainval_dir, _, counts = split_folder(data, workdir, image_size=args.image_size, test_fraction=0.2,
                                           per_class=args.images_per_class)
    config = {
        "workdir": str(workdir), "trainval_dir": str(trainval_dir), "seed": args.seed,
        "image_size": args.image_size, "validation_split": 0.2, "batch_size": 32, "backbone": args.backbone,
        "weights": weights, "phase1_epochs": args.phase1_epochs, "phase2_epochs": args.phase2_epochs,
        "spec_overrides": {"search": {"sampler": "random", "pruner": "none", "baseline_trial": False,
                                      "keep_checkpoints": 0, **SCAN_SPACE}},
    }
    print(f"data {data}: {counts['trainval']} train+validation images; weights {weights}; "
          f"{args.phase1_epochs}+{args.phase2_epochs} epochs; {args.trials} random trials, no pruning; "
          f"runs in {workdir}", flush=True)
    spec_file = workdir / "study.toml"
    spec_file.write_text(spec_toml(config))
    url = f"sqlite:///{workdir / 'study.db'}"
    started = time.time()
    with open(workdir / "launch.log", "w") as log:
        autofinetune_cli("launch", str(spec_file), "--storage", url, "--n-trials", str(args.trials),
                         run_dir=workdir, log=log)
    study = optuna.load_study(study_name=spec_dict(config)["name"], storage=url)
    trials = [{"params": dict(t.params), "val": float(t.value)}
              for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    print(f"{len(trials)} complete trials in {time.time() - started:.0f} s", flush=True)
    return trials


def print_report(trials: list[dict]) -> None:
    for name in SCAN_SPACE:
        header, rows = parameter_table(name, trials)
        print()
        print(format_table(header, rows))
    best = top_quarter(trials)
    rows = []
    for name in SCAN_SPACE:
        values = [t["params"][name] for t in best]
        rows.append([name, f"{min(values):.3g} - {max(values):.3g}", default_range(name)])
    print(f"\nthe top quarter of trials ({len(best)} of {len(trials)}, val >= {min(t['val'] for t in best):.3f})")
    print(format_table(["parameter", "top quarter spans", "default range"], rows))


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0, help="the study's seed (its split and its random samples)")
    parser.add_argument("--weights", default="pretrained",
                        help='"pretrained" (the glyph-pretrained backbone), "random", or a weights file')
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--images-per-class", type=int, default=60)
    parser.add_argument("--phase1-epochs", type=int, default=2)
    parser.add_argument("--phase2-epochs", type=int, default=2)
    parser.add_argument("--data", type=Path, help="image folder, one sub-folder per class [default: digits]")
    tuning = [name for name, task in TASKS.items() if task.role == "tuning"]
    parser.add_argument("--task", help=f"a tuning task of the suite instead of --data: {', '.join(tuning)}")
    parser.add_argument("--backbone", default="resnet50", help=argparse.SUPPRESS)  # tiny_resnet for --smoke
    parser.add_argument("--workdir", type=Path, help="keep the run here [default: a temporary folder]")
    parser.add_argument("--json", type=Path, help="write every trial's parameters and value as JSON")
    parser.add_argument("--smoke", action="store_true",
                        help="check the harness: tiny backbone, random init, 8 images per class, 1+1 epochs, 6 trials")
    args = parser.parse_args(argv)
    if args.task is not None and args.task not in tuning:
        role = f"an {TASKS[args.task].role} task" if args.task in TASKS else "not a task of the suite"
        parser.error(f"--task {args.task}: {role}; defaults are chosen on the tuning tasks only "
                     f"({', '.join(tuning)})")
    if args.task and args.data:
        parser.error("--task renders its own images: leave out --data")
    if args.smoke:
        args.trials, args.images_per_class, args.backbone, args.weights = 6, 8, "tiny_resnet", "random"
        args.phase1_epochs = args.phase2_epochs = 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    trials = run_scan(args)
    if not trials:
        raise SystemExit("no trial completed: see launch.log in the run folder")
    print_report(trials)
    if args.json:
        args.json.write_text(json.dumps({"space": SCAN_SPACE, "trials": trials}, indent=1))
        print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
