"""What a person reads about a study and its trials: Markdown notes and a learning-curve SVG.

Pure functions of the records the study database already holds (the stored spec, a trial's
params, state and user attributes), so the same text comes out whichever engine ran the trial,
whether it is written when the trial ends or later by ``autofinetune dashboard``. Nothing here
imports Optuna, optuna-dashboard or Keras.
"""

from __future__ import annotations

import html
import math
from typing import Any, Mapping, Sequence

#: Trial states as Optuna names them (``TrialState.name``).
COMPLETE, PRUNED, FAIL = "COMPLETE", "PRUNED", "FAIL"

#: The schedule's result states, mapped to Optuna's trial states.
RESULT_STATES = {"complete": COMPLETE, "pruned": PRUNED, "failed": FAIL}


def fmt(value: Any) -> str:
    """A number with 4 significant digits (integers with thousands separators), else ``str``."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)


def _md_cell(value: Any) -> str:
    # A pipe inside a Markdown table cell would end the cell.
    return fmt(value).replace("|", "\\|").replace("\n", " ")


# --- the study note ------------------------------------------------------------------------


def study_note(spec_data: Mapping[str, Any], *, direction: str) -> str:
    """The study's note: what is searched, on which data, and the full spec.

    Args:
        spec_data: The spec as stored on the study (``StudySpec.to_toml_dict()``, storage URL
            already redacted).
        direction: ``"maximize"`` or ``"minimize"``.
    """
    import json

    data = spec_data.get("data", {})
    backbone = spec_data.get("backbone", {})
    schedule = spec_data.get("schedule", {})
    search = spec_data.get("search", {})
    objective = spec_data.get("objective", {}).get("metric", "val_accuracy")
    e1, e2 = schedule.get("phase1_epochs", "?"), schedule.get("phase2_epochs", "?")
    lines = [
        f"## {spec_data.get('name', 'study')}",
        "",
        f"Two-phase fine-tuning of `{backbone.get('name', '?')}` (weights: `{backbone.get('weights', '?')}`), "
        f"{direction} `{objective}`.",
        "",
        f"- **data**: `{data.get('source', '?')}`, {data.get('image_size', '?')}x{data.get('image_size', '?')} "
        f"pixels, validation split {data.get('validation_split', '?')}, batch size {data.get('batch_size', '?')}",
        f"- **phase 1** (backbone frozen, new head, {schedule.get('phase1_optimizer', '?')}): "
        + _span(1, _int_or(e1)),
        "- **phase 2** (top residual blocks unfrozen, SGD + momentum): "
        + (_span(_int_or(e1) + 1, _int_or(e1) + _int_or(e2)) if _int_or(e2) > 0 else "none"),
        f"- **search**: sampler `{search.get('sampler', '?')}`, pruner `{search.get('pruner', '?')}`, "
        f"{search.get('n_trials', '?')} trials; the models of the best {search.get('keep_checkpoints', '?')} are kept",
        "",
        "| parameter | space |",
        "| --- | --- |",
    ]
    from autofinetune.spec import PARAM_RULES

    for name in PARAM_RULES:
        if name in search:
            lines.append(f"| {name} | {_space_text(search[name])} |")
    lines += [
        "",
        "Each trial's note gives its phases; its learning curve and (for the best trials) its "
        "model are among the trial's artifacts.",
        "",
        "### spec",
        "",
        "```json",
        json.dumps(dict(spec_data), indent=2),
        "```",
    ]
    return "\n".join(lines)


def _span(first: int, last: int) -> str:
    return f"step {first}" if first == last else f"steps {first}-{last}"


def _int_or(value: Any, default: int = 0) -> int:
    return value if isinstance(value, int) else default


def _space_text(raw: Any) -> str:
    if isinstance(raw, Mapping):
        text = f"{fmt(raw.get('low'))} .. {fmt(raw.get('high'))}"
        if raw.get("log"):
            text += " (log)"
        if raw.get("step") is not None:
            text += f", step {fmt(raw['step'])}"
        return text
    if isinstance(raw, (list, tuple)):
        return ", ".join(fmt(v) for v in raw) if len(raw) > 1 else f"{fmt(raw[0])} (fixed)"
    return fmt(raw)


# --- a trial's note ------------------------------------------------------------------------


def trial_note(
    *,
    number: int,
    state: str,
    value: float | None,
    params: Mapping[str, Any],
    attrs: Mapping[str, Any],
    objective: str,
    pruner: str | None = None,
    retried_from: int | None = None,
    curve_url: str | None = None,
) -> str:
    """A finished trial's note: phases, unfrozen blocks, best of each phase, speed, outcome.

    Args:
        number: The trial's number.
        state: ``"COMPLETE"``, ``"PRUNED"`` or ``"FAIL"``.
        value: The trial's objective value (its best epoch), when complete.
        params: The trial's parameters.
        attrs: The trial's user attributes (see ``autofinetune.store.recorder.result_attributes``).
        objective: The metric trials are scored by, e.g. ``"val_accuracy"``.
        pruner: The study's pruner, named when the trial was pruned.
        retried_from: The failed trial this one retries, if any.
        curve_url: Where the dashboard serves the trial's ``learning_curve.svg`` artifact; the
            note then shows it.
    """
    headline = f"### Trial {number}: {state}"
    if state == COMPLETE and value is not None:
        headline += f", {objective} {fmt(value)}"
        if attrs.get("best_step") is not None:
            headline += f" at step {attrs['best_step']}"
    lines = [headline, ""]
    if attrs.get("baseline"):
        lines += ["The baseline: the seed tutorial's recipe, moved into the search space.", ""]
    if retried_from is not None:
        reason = attrs.get("retry_reason")
        lines += [f"Retry of trial {retried_from}" + (f" ({reason})." if reason else "."), ""]

    lines += _outcome_lines(state, attrs, objective, pruner)

    boundary = attrs.get("phase_boundary_step")
    history = attrs.get("history") or []
    phases = [p for p in (1, 2) if f"phase{p}_epochs" in attrs or any(h.get("phase") == p for h in history)]
    if phases:
        unfrozen = attrs.get("unfrozen_blocks") or []
        heads = {
            1: "phase 1: backbone frozen",
            2: f"phase 2: top {len(unfrozen)} block{'s' if len(unfrozen) != 1 else ''} unfrozen",
        }
        lines.append("| | " + " | ".join(heads[p] for p in phases) + " |")
        lines.append("| --- |" + " --- |" * len(phases))
        rows = [
            ("steps", lambda p: _steps_text(history, p)),
            (f"best {objective}", lambda p: attrs.get(f"phase{p}_best")),
            ("trainable params", lambda p: attrs.get(f"phase{p}_trainable_params")),
            ("images/s", lambda p: attrs.get(f"phase{p}_images_per_second")),
            ("seconds", lambda p: attrs.get(f"phase{p}_seconds")),
        ]
        for label, get in rows:
            lines.append(f"| {label} | " + " | ".join(_md_cell(get(p)) for p in phases) + " |")
        lines.append("")
    if boundary is not None:
        lines.append(f"- **phase boundary**: after step {boundary}; phase 2 starts at step {boundary + 1}")
    if "unfrozen_blocks" in attrs:
        blocks = attrs.get("unfrozen_blocks") or []
        lines.append(f"- **unfrozen blocks**: {', '.join(f'`{b}`' for b in blocks) if blocks else 'none'}")
    if params:
        lines.append("- **params**: " + ", ".join(f"{k} = {fmt(v)}" for k, v in params.items()))
    if attrs.get("host") or attrs.get("device"):
        device = f" ({attrs['device']})" if attrs.get("device") else ""
        lines.append(f"- **ran on**: {attrs.get('host', '?')}{device}")
    if curve_url:
        lines += ["", f"![learning curve of trial {number}]({curve_url})"]
    return "\n".join(lines).rstrip() + "\n"


def _steps_text(history: Sequence[Mapping[str, Any]], phase: int) -> str:
    steps = [h["step"] for h in history if h.get("phase") == phase and "step" in h]
    if not steps:
        return "-"
    return f"{min(steps)}-{max(steps)}" if len(steps) > 1 else str(steps[0])


def _outcome_lines(state: str, attrs: Mapping[str, Any], objective: str, pruner: str | None) -> list[str]:
    if state == PRUNED:
        step = attrs.get("pruned_at_step")
        history = attrs.get("history") or []
        at_step = next((h.get(objective) for h in history if h.get("step") == step), None)
        by = f"the `{pruner}` pruner" if pruner else "the pruner"
        text = f"**Pruned** after step {fmt(step)} by {by}"
        if at_step is not None:
            text += f": its {objective} there, {fmt(at_step)}, did not pass the pruner's bar at that step"
        text += "."
        if attrs.get("phase_boundary_step") is not None and isinstance(step, int):
            if step <= attrs["phase_boundary_step"]:
                text += " It was stopped in phase 1, before any fine-tuning was paid for."
            else:
                text += " It was stopped during phase 2."
        return [text, ""]
    if state == FAIL:
        reason = attrs.get("fail_reason") or "no reason was recorded"
        return [f"**Failed**: {reason}", ""]
    return []


# --- the learning curve ----------------------------------------------------------------------

_WIDTH, _HEIGHT = 640, 320
_LEFT, _RIGHT, _TOP, _BOTTOM = 56, 16, 56, 44


def companion_metric(objective: str) -> str:
    """The training-set twin of a validation metric, and the other way round."""
    return objective[4:] if objective.startswith("val_") else f"val_{objective}"


def learning_curve_svg(
    history: Sequence[Mapping[str, Any]],
    *,
    objective: str,
    boundary_step: int | None,
    title: str,
    best_step: int | None = None,
    pruned_at_step: int | None = None,
) -> str:
    """A self-contained SVG of a trial's learning curve across both phases.

    The objective and its training (or validation) twin per global step; phase 1 is shaded,
    the phase boundary is a dashed line, the best step a ring, a pruned trial's last step a
    cross.

    Args:
        history: Per-epoch records: ``{"step": 1, "phase": 1, "val_accuracy": ..., ...}``.
        objective: The metric the trial is scored by.
        boundary_step: The last step of phase 1.
        title: Text above the plot.
        best_step: The step of the trial's best value, if any.
        pruned_at_step: The step after which the trial was pruned, if it was.
    """
    other = companion_metric(objective)
    series = []
    for metric, colour, dash in ((objective, "#1f77b4", ""), (other, "#ff7f0e", "6 4")):
        points = [
            (int(h["step"]), float(h[metric]))
            for h in history
            if isinstance(h.get(metric), (int, float)) and math.isfinite(h[metric])
        ]
        if points:
            series.append((metric, colour, dash, points))
    steps = [int(h["step"]) for h in history if "step" in h]
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{_HEIGHT}" '
        f'viewBox="0 0 {_WIDTH} {_HEIGHT}" font-family="sans-serif" font-size="12">',
        f'<rect width="{_WIDTH}" height="{_HEIGHT}" fill="white"/>',
        f'<text x="{_WIDTH / 2}" y="20" text-anchor="middle" font-size="14">{html.escape(title)}</text>',
    ]
    if not series or not steps:
        out.append(f'<text x="{_WIDTH / 2}" y="{_HEIGHT / 2}" text-anchor="middle">no epoch finished</text>')
        return "\n".join(out + ["</svg>"]) + "\n"

    x_lo, x_hi = min(steps), max(steps)
    if x_lo == x_hi:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    values = [v for _, _, _, pts in series for _, v in pts]
    y_lo, y_hi = _padded_range(min(values), max(values))
    plot_w, plot_h = _WIDTH - _LEFT - _RIGHT, _HEIGHT - _TOP - _BOTTOM

    def x_of(step: float) -> float:
        return _LEFT + (step - x_lo) / (x_hi - x_lo) * plot_w

    def y_of(value: float) -> float:
        return _TOP + (1 - (value - y_lo) / (y_hi - y_lo)) * plot_h

    if boundary_step is not None and x_lo <= boundary_step + 0.5 <= x_hi:
        # Phase 1 shaded, the boundary half-way between its last step and phase 2's first.
        edge = x_of(boundary_step + 0.5)
        out.append(f'<rect x="{_LEFT}" y="{_TOP}" width="{edge - _LEFT:.1f}" height="{plot_h}" fill="#f2f2f2"/>')
        out.append(
            f'<line x1="{edge:.1f}" y1="{_TOP}" x2="{edge:.1f}" y2="{_TOP + plot_h}" stroke="#555" '
            'stroke-dasharray="4 3"/>'
        )
        out.append(f'<text x="{(_LEFT + edge) / 2:.1f}" y="{_TOP + 14}" text-anchor="middle" fill="#555">phase 1</text>')
        if edge < _LEFT + plot_w - 20:
            out.append(
                f'<text x="{(edge + _LEFT + plot_w) / 2:.1f}" y="{_TOP + 14}" text-anchor="middle" '
                'fill="#555">phase 2</text>'
            )
    # Axes, ticks and grid.
    out.append(f'<rect x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>')
    for tick in _ticks(y_lo, y_hi):
        y = y_of(tick)
        out.append(f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{_LEFT + plot_w}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{tick:.3g}</text>')
    stride = max(1, math.ceil(len(set(steps)) / 20))
    for step in sorted(set(steps))[::stride]:
        x = x_of(step)
        out.append(f'<line x1="{x:.1f}" y1="{_TOP + plot_h}" x2="{x:.1f}" y2="{_TOP + plot_h + 4}" stroke="#999"/>')
        out.append(f'<text x="{x:.1f}" y="{_TOP + plot_h + 17}" text-anchor="middle">{step}</text>')
    out.append(f'<text x="{_LEFT + plot_w / 2}" y="{_HEIGHT - 8}" text-anchor="middle">step (epoch, both phases)</text>')
    # The curves.
    for metric, colour, dash, points in series:
        path = " ".join(f"{x_of(s):.1f},{y_of(v):.1f}" for s, v in points)
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash_attr}/>')
        for s, v in points:
            out.append(f'<circle cx="{x_of(s):.1f}" cy="{y_of(v):.1f}" r="2.5" fill="{colour}"/>')
    objective_points = dict(series[0][3]) if series[0][0] == objective else {}
    if best_step is not None and best_step in objective_points:
        bx, by = x_of(best_step), y_of(objective_points[best_step])
        out.append(f'<circle cx="{bx:.1f}" cy="{by:.1f}" r="7" fill="none" stroke="#2ca02c" stroke-width="2"/>')
    if pruned_at_step is not None and pruned_at_step in objective_points:
        px, py = x_of(pruned_at_step), y_of(objective_points[pruned_at_step])
        out.append(
            f'<path d="M{px - 6:.1f},{py - 6:.1f} L{px + 6:.1f},{py + 6:.1f} M{px - 6:.1f},{py + 6:.1f} '
            f'L{px + 6:.1f},{py - 6:.1f}" stroke="#d62728" stroke-width="2"/>'
        )
        out.append(f'<text x="{px - 8:.1f}" y="{py + 18:.1f}" text-anchor="end" fill="#d62728">pruned</text>')
    # Legend in one row between the title and the plot, so it never hides a curve.
    legend = [(m, c, d) for m, c, d, _ in series]
    if best_step is not None and best_step in objective_points:
        legend.append((f"best {objective} (step {best_step})", "#2ca02c", "ring"))
    x, y = float(_LEFT), 40.0
    for label, colour, dash in legend:
        if dash == "ring":
            out.append(f'<circle cx="{x + 11}" cy="{y - 4}" r="5" fill="none" stroke="{colour}" stroke-width="2"/>')
        else:
            dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
            out.append(f'<line x1="{x}" y1="{y - 4}" x2="{x + 22}" y2="{y - 4}" stroke="{colour}" stroke-width="2"{dash_attr}/>')
        out.append(f'<text x="{x + 28}" y="{y}">{html.escape(label)}</text>')
        x += 28 + 7 * len(label) + 18
    return "\n".join(out + ["</svg>"]) + "\n"


def _padded_range(low: float, high: float) -> tuple[float, float]:
    if high - low < 1e-9:
        pad = abs(high) * 0.1 or 0.1
    else:
        pad = (high - low) * 0.08
    return low - pad, high + pad


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values inside ``[low, high]`` (1, 2 or 5 times a power of ten apart)."""
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    ticks = []
    value = first
    while value <= high + 1e-12:
        ticks.append(round(value, 12))
        value += step
    return ticks
