"""Trials for the terminal: plain-text tables, and the same as JSON documents for scripts."""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

from autofinetune.store.attributes import (
    CONSTRAINT_MEASURES_ATTR,
    CONSTRAINT_VIOLATIONS_ATTR,
    SELECTION_SCORE_ATTR,
    STUDY_TEST_SCORE_ATTR,
)
from autofinetune.store.retries import retried_trial_number
from autofinetune.store.study import best_feasible_trial, is_multi_objective, main_value, pareto_front
from autofinetune.trial.results import TrialResult


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A left-aligned text table with a header rule."""
    text_rows = [[_cell(value) for value in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in text_rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in text_rows)
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_trial_result(result: TrialResult, *, data_source: str = "") -> str:
    """The per-epoch history, the phase summaries and the outcome of one trial."""
    metric_names = sorted({name for record in result.history for name in record.metrics})
    parts = []
    if data_source:
        parts.append(f"data: {data_source}")
    parts.append("params: " + ", ".join(f"{k}={_cell(v)}" for k, v in result.params.items()))
    parts.append("")
    parts.append(
        format_table(
            ["step", "phase", *metric_names],
            ([r.step, r.phase, *[r.metrics.get(m) for m in metric_names]] for r in result.history),
        )
    )
    parts.append("")
    parts.append(
        format_table(
            ["phase", "epochs", f"best {result.objective}", "trainable params", "seconds", "images/s", "feature cache"],
            (
                [
                    p.phase, p.epochs_run, p.best_value, p.trainable_params, round(p.seconds, 2),
                    round(p.images_per_second, 1), p.cache_note or "-",
                ]
                for p in result.phases
            ),
        )
    )
    parts.append("")
    parts.append(f"unfrozen blocks: {', '.join(result.unfrozen_blocks) or 'none'}")
    outcome = f"state: {result.state}; best {result.objective} = {_cell(result.best_value)} at step {_cell(result.best_step)}"
    if result.pruned_at_step is not None:
        outcome += f"; pruned after step {result.pruned_at_step}"
    if result.error:
        outcome += f"; error: {result.error}"
    parts.append(outcome)
    cache = result.extra.get("cache")
    if cache and cache.get("enabled"):
        parts.append(
            f"feature cache: {cache['dir']} ({cache['hits']} hit(s), {cache['misses']} miss(es), "
            f"{cache['backbone_image_passes']} backbone image-passes)"
        )
    if result.checkpoint_path:
        parts.append(f"checkpoint: {result.checkpoint_path}")
    return "\n".join(parts)


def _duration(trial) -> float | None:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return None
    return round((trial.datetime_complete - trial.datetime_start).total_seconds(), 1)


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_cell(v)}" for k, v in params.items())


def format_study_status(study) -> str:
    """Every trial (number, state, value, duration, pruned-at step, params, device) and the best one."""
    from autofinetune.store.attributes import BASELINE_ATTR, FAIL_REASON_ATTR, WARM_START_ATTR

    rows = []
    for trial in study.get_trials(deepcopy=False):
        note = trial.user_attrs.get(FAIL_REASON_ATTR, "") if trial.state.name == "FAIL" else ""
        if trial.user_attrs.get(BASELINE_ATTR):
            note = "baseline (seed recipe)" + (f"; {note}" if note else "")
        if trial.user_attrs.get(WARM_START_ATTR):
            note = f"warm start: {trial.user_attrs[WARM_START_ATTR]}" + (f"; {note}" if note else "")
        if retried_trial_number(trial) is not None:
            note = f"retry of trial {retried_trial_number(trial)}" + (f"; {note}" if note else "")
        pruned_at = trial.user_attrs.get("pruned_at_step") or (
            trial.last_step if trial.state.name == "PRUNED" else None
        )
        rows.append([trial.number, trial.state.name, _value_cell(trial), _duration(trial), pruned_at,
                     _params_text(trial.params), trial.user_attrs.get("device"), note])
    direction = _direction(study)
    header = f"study {study.study_name!r} ({direction if isinstance(direction, str) else ', '.join(direction)})"
    table = format_table(["trial", "state", "value", "seconds", "pruned at", "params", "device", "note"], rows)
    lines = [header, table, "", format_best_trial(study)]
    if is_multi_objective(study):
        lines += ["", format_pareto_front(study)]
    score = study.user_attrs.get(STUDY_TEST_SCORE_ATTR)
    if score:
        lines.append(describe_test_score(score))
    return "\n".join(lines)


def describe_test_score(score: Mapping[str, Any] | None) -> str:
    """One line: ``test split (96 held-back images), trial 3: accuracy 0.8125, loss 0.61``."""
    if not score:
        return "test split: none held back (data.test_split = 0)"
    return (
        f"test split ({score.get('images')} held-back images), trial {score.get('trial')}: "
        f"accuracy {_cell(score.get('accuracy'))}, loss {_cell(score.get('loss'))}"
    )


def format_best_trial(study) -> str:
    """One line naming the best trial, and how it compares with the baseline trial."""
    from optuna.trial import TrialState

    from autofinetune.store.attributes import BASELINE_ATTR

    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not complete:
        return "best trial: none completed yet"
    best = best_feasible_trial(study)
    if best is None:
        return f"best trial: none of the {len(complete)} completed keeps objective.constraints"
    line = f"best trial: {best.number} with value {_cell(main_value(best))} ({_params_text(best.params)})"
    if is_multi_objective(study):
        line += f"; the Pareto front's best on {objective_names(study)[0]}"
    selection = best.user_attrs.get(SELECTION_SCORE_ATTR)
    if selection:
        line += (
            f"; chosen among the best {selection.get('among')} by {selection.get('metric')} on "
            f"{selection.get('images')} selection images: {_cell(selection.get('value'))}"
        )
    measures = best.user_attrs.get(CONSTRAINT_MEASURES_ATTR)
    if measures:
        kept = "within its constraints" if best.user_attrs.get(CONSTRAINT_VIOLATIONS_ATTR) is not None else "its measures"
        line += f"; {kept}: " + ", ".join(f"{k} = {_cell(v)}" for k, v in measures.items())
    baseline = [t for t in complete if t.user_attrs.get(BASELINE_ATTR)]
    if baseline and baseline[0].number != best.number:
        line += f"; baseline trial {baseline[0].number}: {_cell(main_value(baseline[0]))}"
    elif baseline:
        line += "; the baseline trial is the best so far"
    return line


def _value_cell(trial) -> Any:
    """A trial's value, or its values with several objectives (Optuna's ``value`` raises there)."""
    values: list[float] = list(trial.values or [])
    if len(values) <= 1:
        return values[0] if values else None
    return " / ".join(_cell(v) for v in values)


def objective_names(study) -> list[str]:
    """The study's objectives' names (``launch`` stores them), else Optuna's ``objective 0``, ..."""
    names = study.metric_names
    return list(names) if names else [f"objective {i}" for i in range(len(study.directions))]


def format_pareto_front(study) -> str:
    """The Pareto front as a table: trial number, each objective's value, a params summary.

    Trials that no other one beats on every objective (only those that keep
    ``objective.constraints``); nothing was pruned (a pruner compares one value).
    """
    front = pareto_front(study)
    names = objective_names(study)
    directions = [direction.name.lower() for direction in study.directions]
    title = (
        f"Pareto front ({len(front)} trial(s); " + ", ".join(f"{n} {d}" for n, d in zip(names, directions))
        + "; no trial was pruned: a pruner compares one value)"
    )
    if not front:
        return title + "\nno completed trial yet"
    rows = [[t.number, *t.values, _params_text(t.params)] for t in front]
    return title + "\n" + format_table(["trial", *names, "params"], rows)


def _states_count(trials) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in trials:
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return dict(sorted(counts.items()))


def _direction(study) -> str | list[str]:
    directions = [direction.name.lower() for direction in study.directions]
    return directions[0] if len(directions) == 1 else directions


def _best_value(study, trials) -> float | None:
    """The best trial's value on the main metric (with several objectives, the Pareto front's best)."""
    best = best_feasible_trial(study)
    return None if best is None else _json_number(main_value(best))


def format_studies(storage) -> str:
    """One row per study: name, direction, trials by state, best value."""
    document = studies_document(storage)
    rows = [
        [
            entry["name"], entry["direction"], entry["n_trials"],
            ", ".join(f"{state.lower()} {count}" for state, count in entry["n_trials_by_state"].items()),
            entry["best_value"],
        ]
        for entry in document["studies"]
    ]
    if not rows:
        return "no studies in this database"
    return format_table(["study", "direction", "trials", "states", "best value"], rows)


# --- the same as JSON documents (`status --json`, `studies --json`) ----------------------------


def _json_number(value: float | None) -> float | None:
    """JSON has no NaN or infinity: they become null."""
    if value is None or not math.isfinite(value):
        return None
    return value


def trial_document(trial) -> dict[str, Any]:
    """One trial as JSON-ready data: what `status` shows, plus where it ran and its step count."""
    from autofinetune.store.attributes import BASELINE_ATTR, FAIL_REASON_ATTR, WARM_START_ATTR

    attrs = trial.user_attrs
    return {
        "number": trial.number,
        "state": trial.state.name,
        "value": _json_number(trial.value) if len(trial.values or ()) <= 1 else [_json_number(v) for v in trial.values],
        "params": dict(trial.params),
        "fail_reason": attrs.get(FAIL_REASON_ATTR),
        "pruned_at_step": attrs.get("pruned_at_step") or (trial.last_step if trial.state.name == "PRUNED" else None),
        "baseline": bool(attrs.get(BASELINE_ATTR, False)),
        "retry_of": retried_trial_number(trial),
        "warm_start_from": attrs.get(WARM_START_ATTR),
        "device": attrs.get("device"),
        "host": attrs.get("host"),
        "duration_seconds": _duration(trial),
        "datetime_start": trial.datetime_start.isoformat() if trial.datetime_start else None,
        "datetime_complete": trial.datetime_complete.isoformat() if trial.datetime_complete else None,
        "n_intermediate_values": len(trial.intermediate_values),
    }


def study_status_document(study) -> dict[str, Any]:
    """`status --json`: the study, every trial (see :func:`trial_document`) and the best trial.

    Returns:
        ``{"study", "direction", "n_trials", "n_trials_by_state", "best_trial", "test_score",
        "trials", "objectives", "pareto_front"}``; ``best_trial`` is ``{"number", "value", "params"}``
        (and ``selection_score`` where ``data.selection_split`` made the final choice; with several
        objectives, the Pareto front's best on the main metric; ``pareto_front``
        lists the front's trial numbers, ``None`` with one objective) or ``None`` before one
        completes; ``test_score`` the best trial's on the held-back test split (``{"trial",
        "images", "accuracy", "loss"}``), or ``None``.
    """
    trials = study.get_trials(deepcopy=False)
    best = None
    if _best_value(study, trials) is not None:
        best_trial = best_feasible_trial(study)
        best = {"number": best_trial.number, "value": _json_number(main_value(best_trial)), "params": dict(best_trial.params)}
        if CONSTRAINT_MEASURES_ATTR in best_trial.user_attrs:
            best["constraint_measures"] = best_trial.user_attrs[CONSTRAINT_MEASURES_ATTR]
        if SELECTION_SCORE_ATTR in best_trial.user_attrs:
            best["selection_score"] = best_trial.user_attrs[SELECTION_SCORE_ATTR]
    return {
        "study": study.study_name,
        "direction": _direction(study),
        "n_trials": len(trials),
        "n_trials_by_state": _states_count(trials),
        "best_trial": best,
        "test_score": study.user_attrs.get(STUDY_TEST_SCORE_ATTR),
        "trials": [trial_document(trial) for trial in trials],
        "objectives": objective_names(study),
        "pareto_front": [trial.number for trial in pareto_front(study)] if is_multi_objective(study) else None,
    }


def studies_document(storage) -> dict[str, Any]:
    """`studies --json`: ``{"studies": [{"name", "direction", "n_trials", "n_trials_by_state", "best_value"}]}``."""
    import optuna

    entries = []
    for name in sorted(optuna.get_all_study_names(storage)):
        study = optuna.load_study(study_name=name, storage=storage)
        trials = study.get_trials(deepcopy=False)
        entries.append({
            "name": name,
            "direction": _direction(study),
            "n_trials": len(trials),
            "n_trials_by_state": _states_count(trials),
            "best_value": _best_value(study, trials),
        })
    return {"studies": entries}
