"""A study as one static HTML page, to share without a server.

Optuna's plotly visualizations (optimization history, intermediate values, parallel
coordinates, parameter importances), the best trial's learning curve across both phases, and a
table of every trial. plotly.js is inlined once, so the file opens offline in any browser.
The terminal tables live in :mod:`autofinetune.viewing.report`.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

from autofinetune.data.files import readable_by_others
from autofinetune.errors import ConfigError
from autofinetune.store.retries import retried_trial_number
from autofinetune.store.study import best_feasible_trial, is_multi_objective, pareto_front
from autofinetune.viewing.curves import companion_metric
from autofinetune.viewing.notes import fmt

PLOTLY_EXTRA = "pip install 'autofinetune[dashboard]'"
FIGURE_HEIGHT = 420

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f5f5f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.COMPLETE td.state { color: #2a7a2a; } tr.PRUNED td.state { color: #a66f00; } tr.FAIL td.state { color: #b22222; }
.muted { color: #666; } .figure { margin: 1em 0; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; }
"""


def _require_plotly():
    try:
        import plotly  # noqa: F401
    except ImportError as error:
        raise ConfigError(f"the HTML report needs plotly ({error}); install it with: {PLOTLY_EXTRA}") from None


def _figure_html(figure) -> str:
    figure.update_layout(height=FIGURE_HEIGHT, margin={"l": 60, "r": 20, "t": 50, "b": 50})
    return '<div class="figure">' + figure.to_html(full_html=False, include_plotlyjs=False) + "</div>"


def _section(title: str, body: str) -> str:
    return f"<h2>{html.escape(title)}</h2>\n{body}\n"


def _unavailable(reason: str) -> str:
    return f'<p class="muted">{html.escape(reason)}</p>'


def learning_curve_figure(trial, *, objective: str):
    """A plotly figure of one trial's learning curve, phase 1 shaded and the boundary marked."""
    import plotly.graph_objects as go

    history = trial.user_attrs.get("history") or []
    figure = go.Figure()
    for metric, dash in ((objective, "solid"), (companion_metric(objective), "dash")):
        points = [(h["step"], h[metric]) for h in history if isinstance(h.get(metric), (int, float))]
        if points:
            figure.add_trace(
                go.Scatter(x=[s for s, _ in points], y=[v for _, v in points], mode="lines+markers", name=metric,
                           line={"dash": dash})
            )
    boundary = trial.user_attrs.get("phase_boundary_step")
    steps = [h["step"] for h in history]
    if boundary is not None and steps and min(steps) <= boundary < max(steps):
        figure.add_vrect(x0=min(steps) - 0.5, x1=boundary + 0.5, fillcolor="#888", opacity=0.12, line_width=0,
                         annotation_text="phase 1 (frozen)", annotation_position="top left")
        figure.add_vline(x=boundary + 0.5, line_dash="dot", annotation_text="phase boundary",
                         annotation_position="top right")
    figure.update_layout(title=f"trial {trial.number}: learning curve", xaxis_title="step (epoch, both phases)",
                         yaxis_title=objective)
    figure.update_xaxes(dtick=1)
    return figure


def _trial_note(trial) -> str:
    from autofinetune.store.attributes import BASELINE_ATTR, FAIL_REASON_ATTR, WARM_START_ATTR

    parts = []
    if trial.user_attrs.get(BASELINE_ATTR):
        parts.append("baseline (seed recipe)")
    if trial.user_attrs.get(WARM_START_ATTR):
        parts.append(f"warm start: {trial.user_attrs[WARM_START_ATTR]}")
    if retried_trial_number(trial) is not None:
        parts.append(f"retry of trial {retried_trial_number(trial)}")
    if trial.state.name == "FAIL":
        parts.append(str(trial.user_attrs.get(FAIL_REASON_ATTR, "")))
    if trial.state.name == "PRUNED" and trial.user_attrs.get("pruned_at_step") is not None:
        parts.append(f"pruned after step {trial.user_attrs['pruned_at_step']}")
    return "; ".join(p for p in parts if p)


def _duration(trial) -> float | None:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return None
    return round((trial.datetime_complete - trial.datetime_start).total_seconds(), 1)


def trials_table(trials, *, objective: str) -> str:
    """Every trial as an HTML table row."""
    headers = ["trial", "state", objective, "seconds", "best step", "phase 1 best", "phase 2 best",
               "unfrozen blocks", "params", "note"]
    rows = []
    for t in trials:
        attrs = t.user_attrs
        cells = [
            (t.number, "num"), (t.state.name, "state"), (t.values[0] if t.values else None, "num"), (_duration(t), "num"),
            (attrs.get("best_step"), "num"), (attrs.get("phase1_best"), "num"), (attrs.get("phase2_best"), "num"),
            (len(attrs["unfrozen_blocks"]) if "unfrozen_blocks" in attrs else None, "num"),
            (", ".join(f"{k}={fmt(v)}" for k, v in t.params.items()), ""), (_trial_note(t), ""),
        ]
        tds = "".join(f'<td class="{cls}">{html.escape(fmt(value))}</td>' for value, cls in cells)
        rows.append(f'<tr class="{t.state.name}">{tds}</tr>')
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def render_report(study) -> str:
    """The whole page for ``study``, as HTML text.

    Raises:
        ConfigError: plotly is not installed.
    """
    _require_plotly()
    import plotly.offline
    from optuna.trial import TrialState

    from autofinetune.store.attributes import STUDY_SPEC_ATTR, STUDY_TEST_SCORE_ATTR
    from autofinetune.viewing.report import describe_test_score

    spec_data = (study.user_attrs.get(STUDY_SPEC_ATTR) or {}).get("spec", {})
    objective = spec_data.get("objective", {}).get("metric", "value")
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    direction = study.directions[0].name.lower()
    summary = (
        f"{len(trials)} trials ({', '.join(f'{n} {s.lower()}' for s, n in sorted(counts.items())) or 'none yet'}); "
        f"{direction} <code>{html.escape(objective)}</code>."
    )
    parts = [f"<h1>{html.escape(study.study_name)}</h1>", f"<p>{summary}</p>"]

    best = best_feasible_trial(study)
    if best is not None:
        score = study.user_attrs.get(STUDY_TEST_SCORE_ATTR)
        parts.append(
            _section(
                f"Best trial: {best.number}",
                f"<p>{html.escape(objective)} = <b>{html.escape(fmt(best.values[0]))}</b> at step "
                f"{html.escape(fmt(best.user_attrs.get('best_step')))}; "
                + html.escape(", ".join(f"{k} = {fmt(v)}" for k, v in best.params.items()))
                + "</p>"
                # The validation value is what the search selected on; the test split, what it did not see.
                + (f"<p>{html.escape(describe_test_score(score))}</p>" if score else "")
                + (_figure_html(learning_curve_figure(best, objective=objective)) if best.user_attrs.get("history") else ""),
            )
        )
    if is_multi_objective(study):
        parts += pareto_sections(study)
    for title, make, unavailable in _figures(study, objective, trials, complete):
        if unavailable:
            parts.append(_section(title, _unavailable(f"Not available: {unavailable}.")))
            continue
        try:
            parts.append(_section(title, _figure_html(make())))
        except Exception as error:  # e.g. importances when every trial has the same params
            parts.append(_section(title, _unavailable(f"Not available: {error}")))
    parts.append(_section("Trials", trials_table(trials, objective=objective)))
    if spec_data:
        parts.append(_section("Spec", f"<pre>{html.escape(json.dumps(spec_data, indent=2))}</pre>"))
    generated = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    parts.append(f'<p class="muted">Written by autofinetune on {generated}.</p>')
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(study.study_name)}: autofinetune study</title>"
        f"<style>{_STYLE}</style>"
        f'<script type="text/javascript">{plotly.offline.get_plotlyjs()}</script>'
        "</head><body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )


def _figures(study, objective: str, trials, complete) -> list[tuple[str, Callable[[], Any], str | None]]:
    """Optuna's plots: title, what makes the figure, and why it is not available (or ``None``)."""
    from optuna import visualization

    # With several objectives Optuna's plots need the value to show: the main metric's.
    target = (lambda t: t.values[0]) if is_multi_objective(study) else None
    return [
        ("Optimization history",
         lambda: visualization.plot_optimization_history(study, target=target, target_name=objective),
         None if complete else "needs a completed trial"),
        ("Intermediate values (one per epoch, both phases)",
         lambda: visualization.plot_intermediate_values(study).update_xaxes(dtick=1),
         None if any(t.intermediate_values for t in trials) else "no trial reported an epoch yet"),
        ("Parallel coordinates",
         lambda: visualization.plot_parallel_coordinate(study, target=target, target_name=objective),
         None if complete else "needs a completed trial"),
        ("Parameter importances", lambda: _importances_figure(study, objective, target),
         None if len(complete) >= 2 else f"needs at least 2 completed trials; this study has {len(complete)}"),
    ]


def pareto_sections(study) -> list[str]:
    """A study of several objectives: its Pareto front as a table (trial, each objective,
    params) and, for two or three objectives, Optuna's Pareto-front plot."""
    from optuna import visualization

    from autofinetune.viewing.report import objective_names

    front = pareto_front(study)
    names = objective_names(study)
    directions = [direction.name.lower() for direction in study.directions]
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["trial", *names, "params"])
    rows = "".join(
        "<tr>" + f'<td class="num">{t.number}</td>'
        + "".join(f'<td class="num">{html.escape(fmt(v))}</td>' for v in t.values)
        + f"<td>{html.escape(', '.join(f'{k}={fmt(v)}' for k, v in t.params.items()))}</td></tr>"
        for t in front
    )
    text = (
        f"<p>The trials no other one beats on every objective ({html.escape(', '.join(f'{n} {d}' for n, d in zip(names, directions)))})"
        "; only those that keep <code>objective.constraints</code>. The best trial (exported) is the front's best on "
        f"<code>{html.escape(names[0])}</code>. No trial was pruned: a pruner compares one value.</p>"
    )
    sections = [_section(f"Pareto front ({len(front)} trials)", text + f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")]
    if front and len(names) in (2, 3):
        try:
            sections.append(_section("Pareto front plot", _figure_html(visualization.plot_pareto_front(study, target_names=names))))
        except Exception as error:  # a plot is a view: its failure never loses the page
            sections.append(_section("Pareto front plot", _unavailable(f"Not available: {error}")))
    return sections


def _importances_figure(study, objective: str, target=None):
    """Optuna's parameter importances; its warning that a few trials make them all equal is
    for a console, and the figure shows the same."""
    from optuna import visualization

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Target and region quantiles select the same set of trials")
        return visualization.plot_param_importances(study, target=target, target_name=objective)


def write_report(study, out: str | Path) -> Path:
    """Write the page to ``out`` (replacing a file there) and return its path.

    Raises:
        ConfigError: plotly is missing, ``out`` is a folder, or its folder cannot be written.
    """
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out: {str(out)!r} is a folder; give a file name, e.g. report.html")
    folder = out.absolute().parent
    if not folder.is_dir():
        raise ConfigError(f"--out: cannot write {str(out)!r}: the folder {str(folder)!r} does not exist")
    page = render_report(study)
    temporary: str | None = None
    try:
        # Written beside the target and renamed, so a reader never sees half a page.
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=folder, prefix=f".{out.name}.",
                                         delete=False) as handle:
            temporary = handle.name
            handle.write(page)
        readable_by_others(temporary)  # a report is written to be shared
        os.replace(temporary, out)
    except OSError as error:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)
        raise ConfigError(f"--out: cannot write {str(out)!r} ({error.strerror or error})") from None
    return out
