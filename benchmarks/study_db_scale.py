"""The study database under cluster load: N workers running the real Optuna engine loop.

Each simulated worker is the product's :class:`~autofinetune.engines.optuna.worker.OptunaWorker`
(claim under the stale-trial check and the budget, heartbeats in a background thread, a report
and a prune check per epoch, the result's attributes, the dashboard note and learning curve,
tell) around a fake trial: the schedule's ``run_trial`` is replaced by one that sleeps through
its epochs, reports each through the reporter it is given and returns a real ``TrialResult``.
No TensorFlow or Keras is imported in those processes (checked). Each worker opens its own
storage (its own connections), as a worker on its own machine would; workers are processes
up to ``--max-processes``, then threads inside that many processes.

Per row: trials/s, p50/p99 latency of the claim (stale check + budget + ask), of recording the
result (attributes + note + learning curve) and of the tell, the heartbeat lag (how much later
than its interval a heartbeat landed, p99 and worst), the database server's CPU seconds per
trial, and lost / duplicated / stuck trials, which must all be 0:

* lost: a trial a worker finished that is not finished in the database, or a budget shortfall;
* duplicated: a trial run by two workers, or the queued baseline run twice;
* stuck: trials left RUNNING or WAITING at the end.

``over`` counts trials beyond the budget (workers that checked the budget at the same moment
each start one) and ``stale`` trials failed for missed heartbeats (and retried).

    python benchmarks/study_db_scale.py --quick       # N = 4 and 16 on SQLite (about a minute)
    python benchmarks/study_db_scale.py               # the full table (SQLite and PostgreSQL)
    python benchmarks/study_db_scale.py --n 4 16 --databases postgresql
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's package
sys.path.insert(0, str(ROOT / "tests"))  # the throwaway PostgreSQL server of the tests

#: Modules whose presence in a simulated worker would mean the fake trial was not fake.
HEAVY_MODULES = ("tensorflow", "keras", "jax", "torch")


def bench_spec(*, n_trials: int, epochs: int, heartbeat: int, grace: int, sampler: str) -> dict[str, Any]:
    half = max(1, epochs // 2)
    return {
        "name": "scale",
        "seed": 0,
        "data": {"source": "synthetic", "image_size": 8, "validation_split": 0.25, "batch_size": 8,
                 "synthetic_classes": 2, "synthetic_images_per_class": 4},
        "backbone": {"name": "tiny_resnet", "weights": "none"},
        "schedule": {"phase1_epochs": half, "phase2_epochs": max(1, epochs - half)},
        "search": {
            "n_trials": n_trials, "sampler": sampler, "pruner": "hyperband", "keep_checkpoints": 0,
            "heartbeat_interval": heartbeat, "heartbeat_grace": grace, "trials_per_process": 1_000_000,
            "head_units": [8, 16, 32, 64], "unfreeze_depth": {"low": 0, "high": 16},
        },
    }


# --- the simulated worker process --------------------------------------------------------------


class Timings:
    """Latencies and events of one worker process (threads append; lists are thread-safe enough)."""

    def __init__(self) -> None:
        self.claim: list[float] = []
        self.record: list[float] = []
        self.tell: list[float] = []
        self.heartbeat_lag: list[float] = []
        self.runs: list[dict[str, Any]] = []
        self.errors: list[str] = []


def install_fake_trial(epoch_seconds: float, timings: Timings) -> None:
    """Replace the schedule module with a sleeping fake, and the Keras device query with a constant."""
    import random

    import autofinetune.trial  # noqa: F401  the package only (its __init__ imports nothing)
    from autofinetune.errors import PruneTrial
    from autofinetune.trial.results import EpochRecord, PhaseSummary, TrialResult

    def run_trial(spec, params, data, *, reporter=None, checkpoint_path=None, stop_event=None, **_: Any):
        run = {"trial_id": reporter.trial._trial_id, "number": reporter.trial.number,
               "params": dict(params), "state": "running"}
        timings.runs.append(run)
        rng = random.Random(hash(tuple(sorted(params.items()))))
        history, state, pruned_at = [], "complete", None
        for step in range(1, spec.schedule.total_epochs + 1):
            time.sleep(epoch_seconds)
            accuracy = min(1.0, 0.3 + 0.1 * step + 0.2 * rng.random())
            metrics = {"loss": 1.0 - accuracy, "accuracy": accuracy, "val_loss": 1.1 - accuracy,
                       "val_accuracy": accuracy - 0.05}
            history.append(EpochRecord(step=step, phase=1 if step <= spec.schedule.phase1_epochs else 2, metrics=metrics))
            try:
                reporter.report(step, metrics)
            except PruneTrial:
                state, pruned_at = "pruned", step
                break
        values = [r.metrics[spec.objective.metric] for r in history]
        best = max(range(len(values)), key=values.__getitem__)
        phases = tuple(
            PhaseSummary(phase=p, epochs_run=sum(r.phase == p for r in history),
                         best_value=max((r.metrics[spec.objective.metric] for r in history if r.phase == p), default=None),
                         trainable_params=1000 * p, seconds=epoch_seconds, images_per_second=100.0)
            for p in sorted({r.phase for r in history})
        )
        run["state"] = state
        return TrialResult(
            params=dict(params), objective=spec.objective.metric, direction="maximize", history=tuple(history),
            best_value=values[best], best_step=history[best].step,
            unfrozen_blocks=tuple(f"conv5_block{i}" for i in range(int(params.get("unfreeze_depth", 0)))),
            phases=phases, state=state, pruned_at_step=pruned_at,
        )

    schedule = types.ModuleType("autofinetune.trial.schedule")
    schedule.run_trial = run_trial
    sys.modules["autofinetune.trial.schedule"] = schedule
    # The real device query imports Keras; a simulated worker has no accelerator to describe.
    from autofinetune.engines import trial_path

    trial_path.device_description = lambda: "simulated: none"


def timed_worker_class(timings: Timings):
    """OptunaWorker, timing its claim, the result recording, the tell and the heartbeats."""
    from autofinetune.engines import trial_path
    from autofinetune.engines.optuna import worker as worker_module

    original_record = trial_path._record

    def timed_record(*args: Any, **kwargs: Any):
        # What the one trial path writes once a trial ended: outcome, attributes, curve, note.
        started = time.perf_counter()
        try:
            return original_record(*args, **kwargs)
        finally:
            timings.record.append(time.perf_counter() - started)

    trial_path._record = timed_record

    class TimedWorker(worker_module.OptunaWorker):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            tell, beat = self.study.tell, self.storage.record_heartbeat
            interval = self.spec.search.heartbeat_interval
            last_beat: dict[int, float] = {}

            def timed_tell(*a: Any, **k: Any):
                started = time.perf_counter()
                try:
                    return tell(*a, **k)
                finally:
                    timings.tell.append(time.perf_counter() - started)

            def timed_beat(trial_id: int) -> None:
                beat(trial_id)
                now = time.monotonic()
                if trial_id in last_beat:
                    timings.heartbeat_lag.append(max(0.0, now - last_beat[trial_id] - interval))
                last_beat[trial_id] = now

            self.study.tell = timed_tell
            self.storage.record_heartbeat = timed_beat

        def _claim_next_trial(self, n_trials: int):
            started = time.perf_counter()
            try:
                return super()._claim_next_trial(n_trials)
            finally:
                timings.claim.append(time.perf_counter() - started)

    return TimedWorker


def child_main(args: argparse.Namespace) -> None:
    """One process of simulated workers: build them, wait for the go file, run, write timings."""
    import logging

    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    logging.getLogger("autofinetune").setLevel(logging.ERROR)
    timings = Timings()
    install_fake_trial(args.epoch_seconds, timings)
    worker_class = timed_worker_class(timings)
    url = os.environ["AUTOFINETUNE_STORAGE"]
    workers = []
    for index in range(args.first_index, args.first_index + args.threads):
        workers.append(worker_class("scale", url, worker_index=index, artifacts=args.artifacts))
    Path(args.ready).touch()
    while not Path(args.go).exists():
        time.sleep(0.05)

    def run(worker) -> None:
        try:
            worker.run()
        except BaseException as error:  # reported in the table's notes, never hidden
            timings.errors.append(f"{type(error).__name__}: {error}"[:300])

    threads = [threading.Thread(target=run, args=(w,)) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    heavy = sorted({name.split(".")[0] for name in sys.modules if name.split(".")[0] in HEAVY_MODULES})
    Path(args.out).write_text(json.dumps({**vars(timings), "heavy_modules": heavy, "finished": time.time()}))


# --- the driver ------------------------------------------------------------------------------------


def postgres_cpu_seconds(server) -> float:
    """CPU seconds of the PostgreSQL server: the postmaster, its live and its exited backends."""
    import psutil

    pid = int((server.data / "postmaster.pid").read_text().split()[0])
    root = psutil.Process(pid)
    times = root.cpu_times()
    total = times.user + times.system + times.children_user + times.children_system
    for child in root.children(recursive=True):
        try:
            t = child.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


class ConnectionCounter:
    """The most connections the study's database had at once (sampled twice a second)."""

    def __init__(self, server, url: str) -> None:
        self.server, self.database = server, url.rsplit("/", 1)[1]
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psycopg

        dsn = f"host=127.0.0.1 port={self.server.port} user=postgres dbname=postgres"
        with psycopg.connect(dsn, autocommit=True) as connection:
            while not self._stop.wait(0.5):
                (count,) = connection.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (self.database,)
                ).fetchone()
                self.peak = max(self.peak, count)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def probe_small_writes(server, *, threads: int, seconds: float) -> str:
    """Database CPU per heartbeat and per epoch report: ``threads`` storages write as fast as they
    can on RUNNING trials for ``seconds``. The projection for long trials scales these."""
    import warnings

    import optuna

    from autofinetune.store.database import open_storage

    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    url = server.create_database(f"probe_{int(time.time())}")
    storage = open_storage(url, heartbeat_interval=10, grace_period=60)
    study = optuna.create_study(study_name="probe", storage=storage)
    trial_ids = [study.ask()._trial_id for _ in range(threads)]
    results = []
    for operation in ("heartbeat", "report"):
        counts = [0] * threads
        stop = threading.Event()

        def write(index: int) -> None:
            own = open_storage(url, heartbeat_interval=10, grace_period=60, create=False)
            while not stop.is_set():
                if operation == "heartbeat":
                    own.record_heartbeat(trial_ids[index])
                else:
                    own.set_trial_intermediate_value(trial_ids[index], counts[index], 0.5)
                counts[index] += 1

        workers = [threading.Thread(target=write, args=(i,)) for i in range(threads)]
        cpu_before = postgres_cpu_seconds(server)
        for worker in workers:
            worker.start()
        time.sleep(seconds)
        stop.set()
        for worker in workers:
            worker.join()
        cpu = postgres_cpu_seconds(server) - cpu_before
        total = sum(counts)
        results.append(f"{operation}: {total / seconds:.0f}/s, {1000 * cpu / max(total, 1):.2f} ms database CPU each")
    return "PostgreSQL small writes (" + str(threads) + " threads): " + "; ".join(results)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_row(database: str, n_workers: int, args: argparse.Namespace, folder: Path, server) -> dict[str, Any]:
    """Create a fresh study, run ``n_workers`` simulated workers on it, count what happened."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from autofinetune.spec import parse_spec
    from autofinetune.store.database import open_storage
    from autofinetune.store.study import create_or_resume_study

    row_folder = folder / f"{database}-{n_workers}"
    row_folder.mkdir()
    if database == "sqlite":
        url = f"sqlite:///{row_folder / 'study.db'}"
    else:
        url = server.create_database(f"scale_{n_workers}_{int(time.time() * 1000) % 10**8}")
    n_trials = n_workers * args.trials_per_worker
    spec = parse_spec(
        bench_spec(n_trials=n_trials, epochs=args.epochs, heartbeat=args.heartbeat, grace=args.grace,
                   sampler=args.sampler),
        base_dir=row_folder, origin="scale.toml",
    )
    create_or_resume_study(spec, open_storage(url))

    processes = min(n_workers, args.max_processes)
    per_process = [n_workers // processes + (1 if i < n_workers % processes else 0) for i in range(processes)]
    go = row_folder / "go"
    children, first = [], 0
    env = dict(os.environ, AUTOFINETUNE_STORAGE=url, PYTHONPATH=str(ROOT))
    for index, threads in enumerate(per_process):
        command = [
            sys.executable, __file__, "--child", "--threads", str(threads), "--first-index", str(first),
            "--epoch-seconds", str(args.epoch_seconds), "--ready", str(row_folder / f"ready-{index}"),
            "--go", str(go), "--out", str(row_folder / f"out-{index}.json"),
            "--artifacts", str(row_folder / "artifacts"),
        ]
        children.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        first += threads
    deadline = time.time() + args.row_timeout
    while not all((row_folder / f"ready-{i}").exists() for i in range(processes)):
        if any(c.poll() not in (None, 0) for c in children) or time.time() > deadline:
            for child in children:
                child.kill()
            raise RuntimeError(f"{database} N={n_workers}: a worker process did not start: "
                               + "".join((c.stderr.read() or "")[-1500:] for c in children if c.poll()))
        time.sleep(0.1)
    cpu_before = postgres_cpu_seconds(server) if database == "postgresql" else None
    peak = ConnectionCounter(server, url) if database == "postgresql" else None
    started = time.time()
    go.touch()
    errors: list[str] = []
    for child in children:
        try:
            _, stderr = child.communicate(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            child.kill()
            _, stderr = child.communicate()
            errors.append("a worker process timed out")
        if child.returncode != 0:
            errors.append(f"worker process exited {child.returncode}: {stderr[-500:]}")
    cpu = postgres_cpu_seconds(server) - cpu_before if cpu_before is not None else None
    connections = peak.stop() if peak is not None else None

    outs = [json.loads(p.read_text()) for p in sorted(row_folder.glob("out-*.json"))]
    merged: dict[str, list] = {key: [] for key in ("claim", "record", "tell", "heartbeat_lag", "runs", "errors")}
    heavy: set[str] = set()
    finished = started
    for out in outs:
        for key in merged:
            merged[key].extend(out[key])
        heavy.update(out["heavy_modules"])
        finished = max(finished, out["finished"])
    errors.extend(merged["errors"])
    if heavy:
        errors.append(f"heavy modules imported in a simulated worker: {sorted(heavy)}")

    trials = optuna.load_study(study_name="scale", storage=url).get_trials(deepcopy=False)
    by_id = {t._trial_id: t for t in trials}
    run_ids = [r["trial_id"] for r in merged["runs"]]
    finished_states = (TrialState.COMPLETE, TrialState.PRUNED)
    done = [t for t in trials if t.state in finished_states]
    stale = [t for t in trials if t.state == TrialState.FAIL]
    lost_runs = sum(
        1 for r in merged["runs"] if r["state"] != "running" and by_id[r["trial_id"]].state not in finished_states
        and by_id[r["trial_id"]].state != TrialState.FAIL  # failed as stale: retried, counted in `stale`
    )
    shortfall = max(0, n_trials - len(done))
    baseline_runs = sum(1 for t in trials if t.user_attrs.get("baseline") and t.state in finished_states)
    duplicated = (len(run_ids) - len(set(run_ids))) + max(0, baseline_runs - 1)
    stuck = sum(1 for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING))
    # From the database's clock: workers idle-polling at the end do not stretch the row.
    last = max((t.datetime_complete for t in done if t.datetime_complete), default=None)
    elapsed = (last.timestamp() if last else finished) - started
    return {
        "n": n_workers, "database": database, "processes": processes, "trials": len(done),
        "trials_per_s": len(done) / elapsed if elapsed > 0 else float("nan"), "seconds": elapsed,
        "claim": merged["claim"], "record": merged["record"], "tell": merged["tell"], "lag": merged["heartbeat_lag"],
        "db_cpu_per_trial": (cpu / len(trials)) if cpu is not None and trials else None,
        "db_cpu_share": (cpu / elapsed) if cpu is not None and elapsed > 0 else None,
        "lost": lost_runs + shortfall, "duplicated": duplicated, "stuck": stuck,
        "over": max(0, len(done) - n_trials), "stale": len(stale), "errors": errors,
        "heartbeats": len(merged["heartbeat_lag"]), "connections": connections,
    }


def format_row(row: dict[str, Any]) -> str:
    def ms(values: list[float], q: float) -> str:
        return f"{1000 * percentile(values, q):7.0f}" if values else "      -"

    cpu = "      -" if row["db_cpu_per_trial"] is None else f"{1000 * row['db_cpu_per_trial']:7.1f}"
    share = "    -" if row["db_cpu_share"] is None else f"{row['db_cpu_share']:5.2f}"
    lag = row["lag"]
    return (
        f"{row['n']:>4} {row['database']:<10} {row['processes']:>5} {row['trials']:>6} {row['trials_per_s']:>8.2f} "
        f"{ms(row['claim'], .5)} {ms(row['claim'], .99)} {ms(row['record'], .5)} {ms(row['record'], .99)} "
        f"{ms(row['tell'], .5)} {ms(row['tell'], .99)} {ms(lag, .99)} {ms(lag, 1.0)} {cpu} {share} "
        f"{row['lost']:>4} {row['duplicated']:>4} {row['stuck']:>5} {row['over']:>4} {row['stale']:>5} "
        f"{'-' if row['connections'] is None else row['connections']:>5}"
    )


HEADER = (
    "   N database   procs trials  trials/s   claim50 claim99 rec50   rec99   tell50  tell99  hblag99 hblagmax "
    "dbCPUms dbCPU  lost  dup stuck over stale conns\n"
    "                                          (ms)                                                          "
    "/trial  cores"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N = 4 and 16 on SQLite only")
    parser.add_argument("--n", type=int, nargs="+", help="worker counts (default: 4 16 64 128 256 512)")
    parser.add_argument("--databases", nargs="+", choices=("sqlite", "postgresql"), default=None)
    parser.add_argument("--sqlite-max-n", type=int, default=64, help="largest N run on SQLite")
    parser.add_argument("--trials-per-worker", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of a fake trial (both phases)")
    parser.add_argument("--epoch-seconds", type=float, default=1.5)
    parser.add_argument("--heartbeat", type=int, default=1, help="heartbeat interval, seconds")
    parser.add_argument("--grace", type=int, default=30, help="heartbeat grace, seconds")
    parser.add_argument("--sampler", default="tpe")
    parser.add_argument("--max-processes", type=int, default=16,
                        help="beyond this, threads inside processes (a simulated worker process holds ~260 MB)")
    parser.add_argument("--max-connections", type=int, default=1300, help="of the PostgreSQL test server")
    parser.add_argument("--row-timeout", type=float, default=600)
    # Internal: one process of simulated workers.
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("--threads", "--first-index"):
        parser.add_argument(name, type=int, default=0, help=argparse.SUPPRESS)
    for name in ("--ready", "--go", "--out", "--artifacts"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return 0

    if args.quick:
        # Under two minutes on a busy 2-core machine: fewer processes to start, threads in them.
        args.max_processes = min(args.max_processes, 4)
    # A stopped run still stops its PostgreSQL server (the finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    counts = args.n or ([4, 16] if args.quick else [4, 16, 64, 128, 256, 512])
    databases = args.databases or (["sqlite"] if args.quick else ["sqlite", "postgresql"])
    plan = [(db, n) for db in databases for n in counts if not (db == "sqlite" and n > args.sqlite_max_n)]
    print(f"fake trial: {args.epochs} epochs x {args.epoch_seconds:g} s, {args.trials_per_worker} trials per worker, "
          f"heartbeat every {args.heartbeat} s, sampler {args.sampler}; {os.cpu_count()} CPU(s), "
          f"load average {os.getloadavg()[0]:.2f} at start", flush=True)
    server = None
    if "postgresql" in databases:
        from postgres import PostgresServer

        server = PostgresServer(max_connections=args.max_connections).start()
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="autofinetune-scale-") as tmp:
            print(HEADER, flush=True)
            for database, n_workers in plan:
                row = run_row(database, n_workers, args, Path(tmp), server)
                rows.append(row)
                print(format_row(row), flush=True)
                for error in row["errors"][:5]:
                    print(f"     ! {error}", flush=True)
            if server is not None and not args.quick:
                print(probe_small_writes(server, threads=16, seconds=10), flush=True)
    finally:
        if server is not None:
            server.stop()
    print(f"load average {os.getloadavg()[0]:.2f} at the end", flush=True)
    lost = sum(r["lost"] for r in rows)
    duplicated = sum(r["duplicated"] for r in rows)
    stuck = sum(r["stuck"] for r in rows)
    failed = sum(len(r["errors"]) for r in rows)
    if failed:
        print(f"{failed} worker error(s), listed above", flush=True)
    print(f"lost {lost}, duplicated {duplicated}, stuck {stuck}", flush=True)
    return 0 if lost == duplicated == stuck == failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
