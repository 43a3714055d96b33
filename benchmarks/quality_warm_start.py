"""``search_quality.py --warm-start-from``: autofinetune warm-started from an earlier suite's studies.

On each task the suite runs, ``autofinetune [warm start]`` names in ``search.warm_start`` the
autofinetune study of the same seed of every other task in the earlier suite's ``--workdir``,
and runs beside a cold autofinetune. Its table says, per seed and as the median, when the warm
study reached the cold one's final best validation accuracy, and that time over the cold
study's wall time (the issue's target: at most 1/2).
"""

from __future__ import annotations

import math
from pathlib import Path

from autofinetune.viewing.report import format_table
from quality_spec import STUDY_FILE, study_name
from search_quality import fmt, median_or_none, run_folder, time_to_reach
from tasks import TASKS

#: The search ``--warm-start-from`` adds: autofinetune warm-started from the other tasks' studies.
WARM_START = "autofinetune [warm start]"


def warm_start_sources(folder: Path, task: str, seeds: int) -> list[list[str]]:
    """Per seed, the ``NAME@URL`` of each other task's autofinetune study of that seed in ``folder``.

    Args:
        folder: An earlier suite's ``--workdir`` (``TASK/seedN/autofinetune/study.db``).

    Raises:
        SystemExit: ``folder`` has no other task, or one of them lacks a seed's study (the message
            names the file).
    """
    others = [name for name in TASKS if name != task and (folder / name).is_dir()]
    if not others:
        raise SystemExit(f"--warm-start-from {folder}: no task folder other than {task!r} there "
                         f"(one of {', '.join(TASKS)}, as an earlier suite's --workdir holds them)")
    sources = []
    for seed in range(seeds):
        references = []
        for other in others:
            database = run_folder(folder / other, seed, "autofinetune") / STUDY_FILE
            if not database.is_file():
                raise SystemExit(f"--warm-start-from {folder}: {database} is missing (task {other!r}, seed {seed}: "
                                 f"run the earlier suite with --seeds {seeds} and autofinetune in --searches)")
            references.append(f"{study_name(seed)}@sqlite:///{database.resolve()}")
        sources.append(references)
    return sources


def overrides(sources: list[list[str]]) -> list[dict]:
    """Per seed, the spec settings of the warm-started search: its ``search.warm_start``."""
    return [{"search": {"warm_start": references}} for references in sources]


def warm_start_rows(cold: list[dict], warm: list[dict], budget_s: float) -> list[dict]:
    """Per seed, and then the median over seeds: the cold and warm studies' final best validation
    accuracy, when each reached the cold one's final best, and that time over the cold study's wall time.

    The target is met where ``warm_fraction`` is at most 1/2.
    """
    def reached(run: dict, target: float | None) -> float | None:
        seconds = math.inf if target is None else time_to_reach(run["trials"], target, budget_s)
        return None if math.isinf(seconds) else seconds

    rows = []
    for seed, (cold_run, warm_run) in enumerate(zip(cold, warm)):
        warm_s = reached(warm_run, cold_run["final_val"])
        rows.append({
            "seed": seed, "cold_val": cold_run["final_val"], "warm_val": warm_run["final_val"],
            "cold_s": reached(cold_run, cold_run["final_val"]), "warm_s": warm_s, "cold_wall_s": cold_run["wall_s"],
            "warm_fraction": None if warm_s is None else warm_s / cold_run["wall_s"],
        })
    if rows:
        median = {key: median_or_none([row[key] for row in rows]) for key in ("cold_val", "warm_val", "cold_wall_s")}
        # A time never reached (None) counts as the longest, not as missing.
        median.update({key: median_or_none([math.inf if row[key] is None else row[key] for row in rows])
                       for key in ("cold_s", "warm_s", "warm_fraction")})
        rows.append({"seed": "median", **median})
    return rows


WARM_START_HEADER = ["seed", "cold final val", "warm final val", "cold: s to its final", "warm: s to cold's final",
                     "cold wall s", "warm s / cold wall"]


def warm_start_line(row: dict) -> list[str]:
    """One row of :func:`warm_start_rows` as the table prints it (``-``: not reached)."""
    return [str(row["seed"]), fmt(row["cold_val"]), fmt(row["warm_val"]), fmt(row["cold_s"], 0),
            fmt(row["warm_s"], 0), fmt(row["cold_wall_s"], 0), fmt(row["warm_fraction"], 2)]


def print_warm_start_rows(rows: list[dict]) -> None:
    """The warm-start table of one task."""
    print("\nwarm start: when the warm-started study reached the cold one's final best validation accuracy")
    print(format_table(WARM_START_HEADER, [warm_start_line(row) for row in rows]))


def print_suite_warm_start(documents: dict[str, dict]) -> None:
    """The warm-start table of every task that ran ``autofinetune [warm start]``."""
    rows = [[task, *warm_start_line(row)] for task, document in documents.items()
            for row in document.get("warm_start", [])]
    if rows:
        print(f"\nsuite: {WARM_START} against autofinetune (cold), per seed and the median; - never reached")
        print(format_table(["task", *WARM_START_HEADER], rows))
