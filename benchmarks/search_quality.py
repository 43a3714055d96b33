"""Benchmark: what each search finds in the same wall-clock time, side by side.

On an image folder (scikit-learn's digits by default), from a pretrained backbone by default
(the stand-in committed under ``benchmarks/pretrained/``, which ``benchmarks/pretrain_backbone.py``
makes; ``--weights random`` for the random-init table),
with the same epochs per trial and the same wall-clock budget for each, it runs

  keras-tuner hyperband / keras-tuner random   the seed recipe, bugs fixed, as a HyperModel
  optuna+keras-pruning                         Optuna + optuna-integration's KerasPruningCallback
  ray-asha                                     Ray Tune's ASHA scheduler + OptunaSearch
  autofinetune                                 ``autofinetune launch`` with its defaults

over several seeds, one after another, each in its own process (see ``quality_searches.py``).
The folder is split once (seeded) into train+validation, given to every search, and a held-back
test part that no search sees; each search's best trial (by validation accuracy) is evaluated on
it -- autofinetune's through ``autofinetune export``.

It prints best-so-far validation accuracy against wall time (median [min-max] over seeds), the
median time each search needs to reach keras-tuner Hyperband's final best validation accuracy
(per seed), and the final best validation and test accuracy; ``--plot`` draws the curves and
``--json`` writes the summary.

    python benchmarks/search_quality.py --quick --plot quality.png --json quality.json  # ~10 min
    python benchmarks/search_quality.py --seeds 3 --budget 900                          # hours
    python benchmarks/search_quality.py --weights random --seeds 3 --budget 600

``--variant LABEL KEY=VALUE...`` adds ``autofinetune [LABEL]``: a launch whose spec also sets
those keys (``search.sampler_options.n_startup_trials=4``), to compare defaults side by side;
``launch.OPTION=VALUE`` passes ``--OPTION VALUE`` to ``autofinetune launch`` (``launch.workers=2``).
``--reference OLD.json`` adds the searches of an earlier run with the same settings that this run
leaves out (``--searches autofinetune``): its anchors, run once, stand beside each new
autofinetune run in the tables, curves and JSON, and its keras-tuner Hyperband results stay the
per-seed targets.

``--suite`` (or ``--tasks NAME...``) runs the comparison on each task of ``tasks.py`` in turn
(digits and textures for tuning, glyphs and shapes only reported) and ends with one table; then
``--json``, ``--plot`` and ``--reference`` name folders of ``TASK.json`` / ``TASK.png``
(``quality_suite.py``). ``--warm-start-from DIR`` (an earlier suite's ``--workdir``) adds
``autofinetune [warm start]`` on each task, warm-started from the other tasks' autofinetune
studies in ``DIR``, beside a cold autofinetune, and a table of when it reached the cold one's best
(``quality_warm_start.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow's oneDNN kernels, as every search runs them (why: quality_searches.py).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS.parent))  # this checkout's package
sys.path.insert(0, str(BENCHMARKS))

import numpy as np  # noqa: E402

from autofinetune.viewing.report import format_table  # noqa: E402
from pretrain_backbone import DEFAULT_CACHE, weights_path  # noqa: E402
from weights_parts import committed_weights  # noqa: E402
from quality_searches import SEARCHES  # noqa: E402
from tasks import TASKS  # noqa: E402

TARGET = "keras-tuner hyperband"
TIME_FRACTIONS = (0.1, 0.25, 0.5, 0.75, 1.0)


# --- data -----------------------------------------------------------------------------------------


def default_digits_folder(image_size: int) -> Path:
    """scikit-learn's digits as an image folder (what ``autofinetune make-digits-folder`` writes)."""
    from autofinetune.data.sources import digits_images, write_image_folder

    folder = DEFAULT_CACHE / f"digits-{image_size}px"
    if not folder.is_dir():
        x, y, names = digits_images(image_size)
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        write_image_folder(partial, x, y, names)
        partial.replace(folder)
    return folder


def split_folder(data: Path, workdir: Path, *, image_size: int, test_fraction: float,
                 per_class: int | None, seed: int = 0) -> tuple[Path, Path, dict]:
    """Split ``data`` once: a train+validation folder (copies) and the held-back test images.

    Args:
        per_class: Keep at most this many train+validation images per class (``--quick``).

    Returns:
        ``(trainval_dir, test_file, counts)``; ``test_file`` is an ``.npz`` of ``x`` (uint8 raw
        pixels at ``image_size``), ``y`` and ``class_names``.
    """
    from autofinetune.data.sources import load_image, scan_image_folder

    rng = np.random.default_rng(seed)
    trainval_dir = workdir / "trainval"
    test_x, test_y, names = [], [], []
    n_trainval = 0
    for label, (name, files) in enumerate(scan_image_folder(data)):
        names.append(name)
        order = rng.permutation(len(files))
        n_test = max(1, round(test_fraction * len(files)))
        test_files = [files[i] for i in order[:n_test]]
        keep = [files[i] for i in order[n_test:]]
        if per_class is not None:
            keep = keep[:per_class]
            test_files = test_files[:max(1, round(per_class * test_fraction / (1 - test_fraction)))]
        (trainval_dir / name).mkdir(parents=True, exist_ok=True)
        for path in keep:
            shutil.copyfile(path, trainval_dir / name / path.name)
        n_trainval += len(keep)
        test_x.extend(load_image(path, image_size) for path in test_files)
        test_y.extend([label] * len(test_files))
    test_file = workdir / "test.npz"
    np.savez(test_file, x=np.stack(test_x).astype(np.uint8), y=np.asarray(test_y, dtype=np.int32),
             class_names=np.asarray(names))
    return trainval_dir, test_file, {"trainval": n_trainval, "test": len(test_y), "classes": len(names)}


# --- running -----------------------------------------------------------------------------------------


def run_folder(workdir: Path, seed: int, name: str) -> Path:
    """Where one search of one seed runs (``--warm-start-from`` finds autofinetune's studies here)."""
    return workdir / f"seed{seed}" / "".join(c if c.isalnum() or c in "._" else "-" for c in name)


def run_search(name: str, config: dict, run_dir: Path) -> dict:
    """Run one search in its own process; its result, with the time the harness measured."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {**config, "run_dir": str(run_dir), "result": str(run_dir / "result.json")}
    config_file = run_dir / "config.json"
    config["t0"] = time.time()  # the budget starts now, process start-up included
    config_file.write_text(json.dumps(config))
    with open(run_dir / "output.log", "w") as log:
        code = subprocess.run([sys.executable, str(BENCHMARKS / "quality_searches.py"), name, str(config_file)],
                              stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = (run_dir / "output.log").read_text()[-3000:]
        raise RuntimeError(f"search {name!r} failed (exit {code}); the end of {run_dir / 'output.log'}:\n{tail}")
    return json.loads((run_dir / "result.json").read_text())


def best_so_far(trials: list[dict], t: float) -> float | None:
    """Best validation accuracy among the trials that ended by ``t`` seconds."""
    values = [trial["val"] for trial in trials if trial["end_s"] <= t]
    return max(values) if values else None


def time_to_reach(trials: list[dict], target: float, budget_s: float) -> float:
    """When the best-so-far first reached ``target`` (``inf`` when it never did within the budget)."""
    best = -math.inf
    for trial in sorted(trials, key=lambda t: t["end_s"]):
        if trial["end_s"] > budget_s:
            break
        best = max(best, trial["val"])
        if best >= target - 1e-9:
            return trial["end_s"]
    return math.inf


def median_or_none(values: list[float | None]) -> float | None:
    """Median of the values (``None`` entries count as missing; ``inf`` medians read as ``None``)."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    middle = statistics.median(present)
    return None if math.isinf(middle) else middle


def summarise(runs: dict[str, list[dict]], budget_s: float) -> dict:
    """The JSON summary: per search, medians over seeds of final val/test, time to target, wall time.

    Each seed's target is keras-tuner Hyperband's final best of that seed in ``runs``.
    """
    targets = [run["final_val"] for run in runs.get(TARGET, [])]
    searches = {}
    for name, seeds in runs.items():
        times = []
        for index, run in enumerate(seeds):
            target = targets[index] if index < len(targets) else None
            times.append(None if target is None else time_to_reach(run["trials"], target, budget_s))
        searches[name] = {
            "final_val": median_or_none([run["final_val"] for run in seeds]),
            "final_test": median_or_none([run["final_test"] for run in seeds]),
            "time_to_target_s": median_or_none(times),
            "wall_s": median_or_none([run["wall_s"] for run in seeds]),
            "trials_counted": median_or_none([sum(t["end_s"] <= budget_s for t in run["trials"]) for run in seeds]),
        }
    return {"searches": searches, "target": TARGET}


# --- printing ------------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isinf(value)) else f"{value:.{digits}f}"


def spread(values: list[float | None]) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    if len(present) == 1:
        return fmt(present[0])
    return f"{fmt(statistics.median(present))} [{fmt(min(present))}-{fmt(max(present))}]"


def print_report(runs: dict[str, list[dict]], summary: dict, budget_s: float) -> None:
    points = [fraction * budget_s for fraction in TIME_FRACTIONS]
    header = ["search", *[f"{p:.0f} s" for p in points]]
    rows = [[name, *[spread([best_so_far(run["trials"], p) for run in seeds]) for p in points]]
            for name, seeds in runs.items()]
    print("\nbest-so-far validation accuracy against wall time (median [min-max] over seeds)")
    print(format_table(header, rows))
    header = ["search", "final val", "final test", f"time to {TARGET}'s final val", "trials", "wall s"]
    rows = []
    for name, entry in summary["searches"].items():
        rows.append([name, spread([run["final_val"] for run in runs[name]]),
                     spread([run["final_test"] for run in runs[name]]),
                     "not reached" if entry["time_to_target_s"] is None else f"{entry['time_to_target_s']:.0f} s",
                     fmt(entry["trials_counted"], 0), fmt(entry["wall_s"], 0)])
    print("\nfinal best (median [min-max] over seeds; time to target: median over seeds)")
    print(format_table(header, rows))


def plot_curves(runs: dict[str, list[dict]], budget_s: float, out: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.linspace(0, budget_s, 200)
    figure, axes = plt.subplots(figsize=(8, 5))
    for name, seeds in runs.items():
        curves = np.array([[np.nan if (v := best_so_far(run["trials"], t)) is None else v for t in grid]
                           for run in seeds], dtype=float)
        # The median starts once every seed has a finished trial (a median of the seeds that
        # have one would fall when a slower seed's first, lower trial joins); the spread
        # starts with the first.
        middle = np.median(curves, axis=0)
        with warnings.catch_warnings():  # columns before a search's first trial are all NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            low, high = np.nanmin(curves, axis=0), np.nanmax(curves, axis=0)
        (line,) = axes.step(grid, middle, where="post", label=name)
        if len(seeds) > 1:
            axes.fill_between(grid, low, high, step="post", alpha=0.15, color=line.get_color())
    axes.set_xlim(0, budget_s)
    axes.set_xlabel("wall time (s)")
    axes.set_ylabel("best validation accuracy so far")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)


# --- entry point ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="image folder, one sub-folder per class [default: digits]")
    parser.add_argument("--weights", default="pretrained",
                        help='"pretrained" (the glyph-pretrained backbone), "random", or a weights file')
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--phase1-epochs", type=int, default=3)
    parser.add_argument("--phase2-epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--budget", type=float, default=900.0, help="wall-clock seconds per search (default 900)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--searches", nargs="+", choices=SEARCHES, default=list(SEARCHES))
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar=("LABEL", "KEY=VALUE"),
                        help="also run `autofinetune [LABEL]`, its spec setting KEY (section.key, e.g. "
                             "search.pruner_options.min_resource) to VALUE (a TOML value), or with "
                             "launch.OPTION=VALUE its command line (launch.workers=2); repeatable")
    parser.add_argument("--reference", type=Path,
                        help="an earlier --json with the same settings: the searches this run leaves out are "
                             "taken from it (its keras-tuner Hyperband the per-seed targets)")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--images-per-class", type=int, help="at most this many train+validation images per class")
    parser.add_argument("--max-trials", type=int, help="also stop each search after this many trials")
    parser.add_argument("--backbone", default="resnet50", help=argparse.SUPPRESS)  # tiny_resnet for --smoke
    parser.add_argument("--workdir", type=Path, help="keep the runs here [default: a temporary folder]")
    parser.add_argument("--json", type=Path, help="write the summary as JSON")
    parser.add_argument("--plot", type=Path, help="write the curves as a PNG")
    parser.add_argument("--quick", action="store_true", help="1 seed, 60 images per class, 2+2 epochs, 100 s each")
    parser.add_argument("--smoke", action="store_true",
                        help="check the harness: tiny backbone, random init, 8 images per class, 1+1 epochs, 2 trials")
    parser.add_argument("--suite", action="store_true",
                        help="run on every task of benchmarks/tasks.py; --json, --plot and --reference are then "
                             "folders holding TASK.json / TASK.png (see quality_suite.py)")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, help="run the suite on these tasks only (implies --suite)")
    parser.add_argument("--warm-start-from", type=Path, metavar="DIR",
                        help="an earlier suite's --workdir: also run `autofinetune [warm start]` on each task, "
                             "warm-started from the other tasks' autofinetune studies there (seed N from their "
                             "seed N), beside a cold autofinetune (implies --suite)")
    args = parser.parse_args(argv)
    if args.warm_start_from and "autofinetune" not in args.searches:
        parser.error("--warm-start-from compares with a cold autofinetune: keep autofinetune in --searches")
    if (args.suite or args.tasks or args.warm_start_from) and args.data:
        parser.error("--suite renders its own tasks: leave out --data")
    if args.quick:
        args.seeds, args.images_per_class, args.budget = 1, 60, 100.0
        args.phase1_epochs = args.phase2_epochs = 2
    if args.smoke:
        # The budget only bounds a stalled search here: 2 trials end each one.
        args.seeds, args.images_per_class, args.budget, args.max_trials = 1, 8, 300.0, 2
        args.phase1_epochs = args.phase2_epochs = 1
        args.backbone, args.weights = "tiny_resnet", "random"
    return args


def parse_variant(words: list[str]) -> tuple[str, dict[str, dict]]:
    """``["LABEL", "search.sampler_options.n_startup_trials=4", ...]`` -> name, spec overrides.

    Raises:
        SystemExit: a setting is not ``section.key=VALUE`` (the message names it).
    """
    label, *settings = words
    overrides: dict[str, dict] = {}
    for setting in settings:
        key, sep, raw = setting.partition("=")
        path = key.strip().split(".")
        if not sep or len(path) < 2 or not all(path):
            raise SystemExit(f"--variant {label}: {setting!r} is not SECTION.KEY=VALUE "
                             "(e.g. search.sampler_options.n_startup_trials=4)")
        try:
            value = tomllib.loads(f"value = {raw.strip()}")["value"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()  # a bare word: a string
        table = overrides.setdefault(path[0], {})
        for part in path[1:-1]:
            table = table.setdefault(part, {})
        table[path[-1]] = value
    return f"autofinetune [{label}]", overrides


def reference_runs(path: Path, settings: dict, seeds: int, *, running: list[str]) -> dict[str, list[dict]]:
    """The runs of an earlier ``--json`` that this run leaves out, ``seeds`` seeds of each.

    Args:
        running: The searches this run runs itself.

    Raises:
        SystemExit: the earlier run used other settings or fewer seeds, or neither run has
            keras-tuner Hyperband (the target).
    """
    earlier = json.loads(path.read_text())
    differ = {key: (earlier["settings"].get(key), value) for key, value in settings.items()
              if earlier["settings"].get(key) != value}
    if differ:
        listed = ", ".join(f"{key} {old!r} there, {new!r} here" for key, (old, new) in sorted(differ.items()))
        raise SystemExit(f"--reference {path}: another setup ({listed})")
    added = {name: runs for name, runs in earlier.get("runs", {}).items() if name not in running}
    if TARGET not in running and not added.get(TARGET):
        raise SystemExit(f"--reference {path}: it has no {TARGET!r} runs")
    for name, runs in added.items():
        if len(runs) < seeds:
            raise SystemExit(f"--reference {path}: {len(runs)} seed(s) of {name}, this run has {seeds}")
    return {name: runs[:seeds] for name, runs in added.items()}


def resolve_weights(args) -> str:
    """``"none"`` or the path of the weights file.

    ``pretrained`` is the committed stand-in backbone (``benchmarks/pretrained/``, checked by
    hash), so that runs on every machine start from the same weights; at an image size with none
    committed, the backbone is pretrained here first (``benchmarks/pretrain_backbone.py``).
    """
    if args.weights == "random":
        return "none"
    if args.weights != "pretrained":
        return str(Path(args.weights).resolve())
    committed = committed_weights(args.image_size, DEFAULT_CACHE)
    if committed is not None:
        return str(committed)
    path = weights_path(DEFAULT_CACHE, args.image_size)
    if not path.is_file():
        print(f"no backbone is committed for {args.image_size}x{args.image_size} and {path} is missing: "
              "pretraining it first (benchmarks/pretrain_backbone.py)", flush=True)
        subprocess.run([sys.executable, str(BENCHMARKS / "pretrain_backbone.py"), "--image-size",
                        str(args.image_size)], check=True)
    return str(path)


def compare(args: argparse.Namespace) -> dict:
    """Run every search on ``args.data`` (or the digits), print the tables; the JSON document.

    ``args.task`` (set by ``--suite``) names the task: it joins the settings a ``--reference``
    must share, so one task's anchors never stand in for another's.
    """
    variants = [parse_variant(words) for words in args.variant]  # a bad one stops before any work
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="search-quality-"))
    workdir.mkdir(parents=True, exist_ok=True)
    weights = resolve_weights(args)
    data = args.data or default_digits_folder(args.image_size)
    trainval_dir, test_file, counts = split_folder(data, workdir, image_size=args.image_size,
                                                   test_fraction=args.test_fraction, per_class=args.images_per_class)
    print(f"data {data}: {counts['trainval']} train+validation images, {counts['test']} held-back test images, "
          f"{counts['classes']} classes; weights {weights}; {args.phase1_epochs}+{args.phase2_epochs} epochs; "
          f"{args.budget:.0f} s per search; {args.seeds} seed(s); runs in {workdir}", flush=True)
    base_config = {
        "workdir": str(workdir), "trainval_dir": str(trainval_dir), "test_file": str(test_file),
        "image_size": args.image_size, "validation_split": 0.2, "batch_size": args.batch_size,
        "backbone": args.backbone, "weights": weights, "phase1_epochs": args.phase1_epochs,
        "phase2_epochs": args.phase2_epochs, "budget_s": args.budget, "max_trials": args.max_trials,
    }
    compared = {key: value for key, value in base_config.items() if key not in ("workdir", "trainval_dir", "test_file")}
    compared.update(counts)
    # The file's name, not its folder: the committed stand-in's name holds its parts' digest, and
    # its cache folder differs between machines.
    compared["weights"] = weights if weights == "none" else Path(weights).name
    if getattr(args, "task", None):
        compared["task"] = args.task
    # name -> (the search quality_searches.py runs, the spec settings it adds on each seed)
    searches: dict[str, tuple[str, list[dict]]] = {name: (name, [{}] * args.seeds) for name in args.searches}
    for name, overrides in variants:
        searches[name] = ("autofinetune", [overrides] * args.seeds)
    warm_start = getattr(args, "warm_start", None)  # per seed, the studies to start from (quality_warm_start)
    if warm_start:
        import quality_warm_start

        searches[quality_warm_start.WARM_START] = ("autofinetune", quality_warm_start.overrides(warm_start))
    earlier: dict[str, list[dict]] = {}
    if args.reference:
        earlier = reference_runs(args.reference, compared, args.seeds, running=list(searches))
        print(f"from {args.reference}: " + ", ".join(earlier) + (
            f"; targets ({TARGET}'s final best per seed): " + ", ".join(fmt(run["final_val"]) for run in earlier[TARGET])
            if TARGET in earlier else ""), flush=True)
    runs: dict[str, list[dict]] = {**earlier, **{name: [] for name in searches}}
    for seed in range(args.seeds):
        for name, (search, overrides_by_seed) in searches.items():
            config = {**base_config, "seed": seed, "spec_overrides": overrides_by_seed[seed]}
            result = run_search(search, config, run_folder(workdir, seed, name))
            runs[name].append(result)
            counted = sum(trial["end_s"] <= args.budget for trial in result["trials"])
            print(f"seed {seed} {name}: {len(result['trials'])} trials finished, {counted} within the budget; "
                  f"best val {fmt(result['final_val'])}, test {fmt(result['final_test'])}, {result['wall_s']:.0f} s",
                  flush=True)
    summary = summarise(runs, args.budget)
    if earlier:
        summary["from_reference"] = {"file": str(args.reference), "searches": list(earlier)}
    print_report(runs, summary, args.budget)
    if warm_start:  # parse_args made sure the cold autofinetune ran too
        summary["warm_start"] = quality_warm_start.warm_start_rows(
            runs["autofinetune"], runs[quality_warm_start.WARM_START], args.budget)
        quality_warm_start.print_warm_start_rows(summary["warm_start"])
    if args.plot:
        start = "pretrained" if weights != "none" else "random init"
        plot_curves(runs, args.budget, args.plot, title=f"{data.name}, {start}, {args.seeds} seed(s)")
        print(f"plot: {args.plot}")
    variant_settings = {name: overrides for name, overrides in variants if overrides}
    if warm_start:
        variant_settings[quality_warm_start.WARM_START] = {"search": {"warm_start": warm_start}}
    document = {**summary, "settings": {**compared, "seeds": args.seeds}, "variants": variant_settings, "runs": runs}
    if args.json:
        args.json.write_text(json.dumps(document, indent=1, default=str))
        print(f"json: {args.json}")
    print(json.dumps(summary, indent=1))
    return document


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.suite or args.tasks or args.warm_start_from:
        from quality_suite import run_suite

        return run_suite(args, compare)
    compare(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
