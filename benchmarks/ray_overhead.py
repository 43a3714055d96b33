"""What Ray Tune costs per trial, against the Optuna engine, on this machine.

Runs the same list of tiny-backbone trials (tiny_resnet, synthetic 16x16 images, 1+1 epochs,
no pruning) four ways through ``autofinetune launch``: the Optuna engine with 1 and 2 worker
processes, and the Ray engine with 1 and 2 trials at a time. The trials are queued in the
study before each launch, so every run trains exactly the same params.

Per run it prints the wall time (the whole ``launch`` command: Python and TensorFlow start-up,
Ray start-up for Ray) and, per trial, the time the study database shows the trial open (asked
to told) minus the time ``model.fit`` took: what an engine adds around the training (Ray: actor
scheduling, a fresh process importing TensorFlow, loading the data, reporting each epoch).

    python benchmarks/ray_overhead.py [--trials 4] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPEC = """\
name = "overhead"
seed = 0

[data]
source = "synthetic"
image_size = 16
validation_split = 0.25
batch_size = 16
synthetic_classes = 3
synthetic_images_per_class = 16

[backbone]
name = "tiny_resnet"
weights = "none"

[schedule]
phase1_epochs = 1
phase2_epochs = 1

[search]
n_trials = {n_trials}
pruner = "none"
baseline_trial = false
keep_checkpoints = 1
head_units = [8, 16]
unfreeze_depth = {{ low = 0, high = 16 }}
phase1_lr = {{ low = 0.001, high = 0.01, log = true }}
phase2_lr = {{ low = 0.0001, high = 0.01, log = true }}
"""

#: (label, engine, concurrency, extra launch arguments)
RUNS = [
    ("optuna", "optuna", 1, ["--workers", "1"]),
    ("optuna", "optuna", 2, ["--workers", "2"]),
    # One trial at a time gets both CPUs (TensorFlow's threads follow --cpus-per-trial).
    ("ray", "ray", 1, ["--max-concurrent", "1", "--cpus-per-trial", "2"]),
    ("ray", "ray", 2, ["--max-concurrent", "2", "--cpus-per-trial", "1"]),
]


def trial_list(n: int) -> list[dict]:
    """``n`` fixed, different parameter sets inside the spec's space."""
    return [
        {
            "head_units": (8, 16)[i % 2],
            "unfreeze_depth": (i * 5) % 17,
            "phase1_lr": 0.001 * (1 + i),
            "phase1_momentum": 0.0,
            "phase2_lr": 0.0001 * (1 + 2 * i),
            "phase2_momentum": 0.9,
            "dropout": 0.0,
            "label_smoothing": 0.0,
        }
        for i in range(n)
    ]


def run_once(folder: Path, engine: str, extra: list[str], n_trials: int) -> dict:
    """Create the study with the trial list queued, launch it, and measure."""
    import optuna

    from autofinetune.spec import load_spec
    from autofinetune.store.database import open_storage
    from autofinetune.store.study import create_or_resume_study

    folder.mkdir(parents=True)
    spec_path = folder / "overhead.toml"
    spec_path.write_text(SPEC.format(n_trials=n_trials), encoding="utf-8")
    url = f"sqlite:///{folder / 'study.db'}"
    study, _ = create_or_resume_study(load_spec(spec_path), open_storage(url))
    for params in trial_list(n_trials):
        study.enqueue_trial(params)
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "autofinetune.cli", "launch", str(spec_path), "--storage", url, "--engine", engine, *extra],
        cwd=folder, capture_output=True, text=True, env=dict(os.environ),
    )
    wall = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(f"{engine} {extra} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    trials = optuna.load_study(study_name="overhead", storage=url).get_trials()
    done = [t for t in trials if t.state.name == "COMPLETE"]
    if len(done) != n_trials:
        raise SystemExit(f"{engine} {extra}: {len(done)} of {n_trials} trials completed")
    open_s = [(t.datetime_complete - t.datetime_start).total_seconds() for t in done]
    fit_s = [t.user_attrs["fit_seconds"] for t in done]
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    return {
        "wall": wall,
        "span": span,
        "open": statistics.mean(open_s),
        "fit": statistics.mean(fit_s),
        "overhead": statistics.mean(o - f for o, f in zip(open_s, fit_s)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4, help="trials per run (the same list each time)")
    parser.add_argument("--keep", type=Path, help="keep the study databases in this folder")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    root = args.keep or Path(tempfile.mkdtemp(prefix="ray-overhead-"))
    results = []
    for index, (label, engine, concurrency, extra) in enumerate(RUNS):
        print(f"running {label} x{concurrency} ...", file=sys.stderr, flush=True)
        results.append((label, concurrency, run_once(root / f"{index}-{label}-{concurrency}", engine, extra, args.trials)))

    from autofinetune.viewing.report import format_table

    sequential = {label: r["wall"] for label, c, r in results if c == 1}
    rows = [
        [
            label, concurrency, round(r["wall"], 1), round(sequential[label] / r["wall"], 2),
            round(r["span"], 1), round(r["wall"] - r["span"], 1),
            round(r["open"], 1), round(r["fit"], 1), round(r["overhead"], 1),
        ]
        for label, concurrency, r in results
    ]
    print(f"{args.trials} trials each (tiny_resnet, 16x16 synthetic, 1+1 epochs), {os.cpu_count()} CPUs")
    print(format_table(
        ["engine", "at once", "wall s", "speed-up", "trials span s", "start/stop s", "trial open s", "fit s",
         "overhead s/trial"],
        rows,
    ))


if __name__ == "__main__":
    main()
