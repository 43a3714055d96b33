"""Framework overhead per trial and worker memory over a long study (Optuna engine).

Runs a study of N tiny-backbone trials into a temporary SQLite database and prints, per trial:
the time inside ``model.fit`` (phases), the rest of the schedule (building, compiling, saving the
checkpoint) and the engine's own overhead (sampling, storage writes, heartbeats, checkpoint
upload, ask/tell); then the resident memory (RSS) of a worker after 3 and after N trials, once
in one long-lived process and once with the product's worker recycling.

    python benchmarks/search_overhead.py            # 30 trials each way (about 10 minutes here)
    python benchmarks/search_overhead.py --trials 6 # a quick look
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPEC = """
name = "overhead"
seed = 0
[data]
source = "synthetic"
image_size = 32
batch_size = 32
synthetic_classes = 10
synthetic_images_per_class = 60
[backbone]
name = "tiny_resnet"
[schedule]
phase1_epochs = 2
phase2_epochs = 2
[search]
n_trials = {n_trials}
pruner = "none"
trials_per_process = {per_process}
head_units = [16, 32, 64]
unfreeze_depth = {{ low = 0, high = 16 }}
"""


def _rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def in_process(folder: Path, n_trials: int) -> tuple[list[dict], dict[int, float]]:
    """One worker process running every trial; timings per trial and RSS after each."""
    from autofinetune.spec import load_spec
    from autofinetune.engines.optuna.worker import OptunaWorker
    from autofinetune.store.database import open_storage
    from autofinetune.store.study import create_or_resume_study

    spec_path = folder / "inproc.toml"
    spec_path.write_text(SPEC.format(n_trials=n_trials, per_process=n_trials + 1))
    url = f"sqlite:///{folder / 'inproc.db'}"
    spec = load_spec(spec_path)
    create_or_resume_study(spec, open_storage(url))
    rows: list[dict] = []
    rss: dict[int, float] = {}

    class TimedWorker(OptunaWorker):
        claim_started = 0.0

        def _claim_next_trial(self, n_trials: int):
            self.claim_started = time.perf_counter()
            return super()._claim_next_trial(n_trials)

        def _run_one_trial(self, trial, bar) -> None:
            super()._run_one_trial(trial, bar)
            # From the claim (stale check, budget, ask) to the end of tell.
            rows.append({"iteration_seconds": time.perf_counter() - self.claim_started})
            rss[len(rows)] = _rss_mb(os.getpid())

    worker = TimedWorker("overhead", url)
    worker.run()
    for row, trial in zip(rows, worker.study.get_trials()):
        row["fit_seconds"] = trial.user_attrs["fit_seconds"]
        row["schedule_seconds"] = trial.user_attrs["schedule_seconds"]
    return rows, rss


def recycled(folder: Path, n_trials: int, per_process: int) -> dict[str, float]:
    """``autofinetune launch`` with worker recycling; the worker's RSS sampled as it runs."""
    import optuna
    import psutil

    spec_path = folder / "recycled.toml"
    spec_path.write_text(SPEC.format(n_trials=n_trials, per_process=per_process))
    url = f"sqlite:///{folder / 'recycled.db'}"
    launch = subprocess.Popen(
        [sys.executable, "-m", "autofinetune.cli", "launch", str(spec_path), "--storage", url],
        cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    peak_by_done: dict[int, float] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                children = psutil.Process(launch.pid).children()
                done = sum(
                    t.state.is_finished()
                    for t in optuna.load_study(study_name="overhead", storage=url).get_trials(deepcopy=False)
                )
                for child in children:
                    peak_by_done[done] = max(peak_by_done.get(done, 0.0), child.memory_info().rss / 2**20)
            except Exception:  # the study or a child may not exist yet, or just ended
                pass
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    launch.wait()
    stop.set()
    sampler.join()
    early = max(v for k, v in peak_by_done.items() if k <= 3)
    return {"peak_rss_first_3_mb": early, "peak_rss_all_mb": max(peak_by_done.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--per-process", type=int, default=10, help="trials per worker process when recycling")
    args = parser.parse_args()

    from autofinetune.viewing.report import format_table

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows, rss = in_process(folder, args.trials)
        recycling = recycled(folder, args.trials, args.per_process)

    # The first trial pays for TensorFlow's one-time start-up; report it apart.
    steady = rows[1:] if len(rows) > 1 else rows

    def mean(key: str) -> float:
        return statistics.mean(r[key] for r in steady)

    iteration, schedule, fit = mean("iteration_seconds"), mean("schedule_seconds"), mean("fit_seconds")
    engine = iteration - schedule
    build = schedule - fit
    print(f"Per trial, mean of trials 2..{len(rows)} (tiny_resnet, 600 synthetic 32x32 images, 2+2 epochs):")
    print(format_table(
        ["part", "seconds", "share of trial"],
        [
            ["model.fit (both phases)", round(fit, 3), f"{fit / iteration:.1%}"],
            ["schedule outside fit (build, compile, save checkpoint)", round(build, 3), f"{build / iteration:.1%}"],
            ["engine overhead (sample, store, heartbeat, upload, ask/tell)", round(engine, 3), f"{engine / iteration:.1%}"],
            ["whole trial", round(iteration, 3), "100%"],
        ],
    ))
    print()
    last = max(rss)
    print("Worker memory (RSS, MiB):")
    print(format_table(
        ["worker", "after 3 trials", f"after {last} trials", "growth"],
        [
            ["one process for every trial", round(rss[min(3, last)], 1), round(rss[last], 1),
             round(rss[last] - rss[min(3, last)], 1)],
            [f"recycled every {args.per_process} trials", round(recycling["peak_rss_first_3_mb"], 1),
             round(recycling["peak_rss_all_mb"], 1), round(recycling["peak_rss_all_mb"] - recycling["peak_rss_first_3_mb"], 1)],
        ],
    ))


if __name__ == "__main__":
    main()
