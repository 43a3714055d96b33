"""What a person reads about a study and its trials: Markdown notes for optuna-dashboard.

Pure functions of the records the study database already holds (the stored spec, a trial's
params, state and user attributes), so the same text comes out whichever engine ran the trial,
whether it is written when the trial ends or later by ``autofinetune dashboard``. Nothing here
imports Optuna, optuna-dashboard or Keras.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from autofinetune.store.attributes import CONSTRAINT_MEASURES_ATTR, CONSTRAINT_VIOLATIONS_ATTR

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
    backbones = _one_or_choices(search.get("backbone"), backbone.get("name", "?"))
    optimizers = _one_or_choices(search.get("phase1_optimizer"), schedule.get("phase1_optimizer", "?"))
    lines = [
        f"## {spec_data.get('name', 'study')}",
        "",
        f"Two-phase fine-tuning of {backbones} (weights: `{backbone.get('weights', '?')}`), "
        f"{direction} `{objective}`.",
        "",
        f"- **data**: `{data.get('source', '?')}`, {data.get('image_size', '?')}x{data.get('image_size', '?')} "
        f"pixels, validation split {data.get('validation_split', '?')}, batch size {data.get('batch_size', '?')}",
        f"- **phase 1** (backbone frozen, new head, {optimizers}): "
        + _span(1, _int_or(e1)),
        "- **phase 2** (top residual blocks unfrozen, SGD + momentum): "
        + (_span(_int_or(e1) + 1, _int_or(e1) + _int_or(e2)) if _int_or(e2) > 0 else "none"),
        f"- **search**: sampler `{search.get('sampler', '?')}`, pruner `{search.get('pruner', '?')}`, "
        f"{search.get('n_trials', '?')} trials; the models of the best {search.get('keep_checkpoints', '?')} are kept",
        *_constraints_line(spec_data.get("objective", {}).get("constraints") or []),
        *_pareto_line(spec_data.get("objective", {}).get("pareto_with") or []),
        "",
        "| parameter | space |",
        "| --- | --- |",
    ]
    from autofinetune.spec import PARAMETERS

    for name, parameter in PARAMETERS.items():
        if name in search:
            condition = parameter.active_when
            when = f" (where {condition[0]} is {' or '.join(condition[1])})" if condition else ""
            lines.append(f"| {name}{when} | {_space_text(search[name])} |")
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


def _one_or_choices(choices: Any, fixed: Any) -> str:
    """``"one of `a`, `b`"`` where the search chooses, else the spec's one value."""
    if isinstance(choices, list) and len(choices) > 1:
        return "one of " + ", ".join(f"`{name}`" for name in choices)
    return f"`{fixed}`"


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
        attrs: The trial's user attributes (see :func:`autofinetune.store.trial_writer.result_attributes`).
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
    missing = attrs.get("record_warnings") or []
    if missing:
        lines += ["**Not recorded** (the outcome above is): " + "; ".join(str(item) for item in missing), ""]

    lines += _phase_table(attrs, objective)
    boundary = attrs.get("phase_boundary_step")
    if boundary is not None:
        lines.append(f"- **phase boundary**: after step {boundary}; phase 2 starts at step {boundary + 1}")
    if "unfrozen_blocks" in attrs:
        blocks = attrs.get("unfrozen_blocks") or []
        of = f" of `{params['backbone']}`" if params and "backbone" in params else ""
        lines.append(f"- **unfrozen blocks**{of}: {', '.join(f'`{b}`' for b in blocks) if blocks else 'none'}")
    measures = attrs.get(CONSTRAINT_MEASURES_ATTR)
    if measures:
        kept = all(violation <= 0 for violation in attrs.get(CONSTRAINT_VIOLATIONS_ATTR) or ())
        lines.append(
            "- **constraints**: " + ", ".join(f"{k} = {fmt(v)}" for k, v in measures.items())
            + (" (all kept)" if kept else " (past a limit: not a candidate for the best trial)")
        )
    if params:
        lines.append("- **params**: " + ", ".join(f"{k} = {fmt(v)}" for k, v in params.items()))
    if attrs.get("host") or attrs.get("device"):
        device = f" ({attrs['device']})" if attrs.get("device") else ""
        lines.append(f"- **ran on**: {attrs.get('host', '?')}{device}")
    if curve_url:
        lines += ["", f"![learning curve of trial {number}]({curve_url})"]
    return "\n".join(lines).rstrip() + "\n"


def _phase_table(attrs: Mapping[str, Any], objective: str) -> list[str]:
    """A Markdown table of the phases the trial ran: steps, best value, size, speed, time."""
    history = attrs.get("history") or []
    phases = [p for p in (1, 2) if f"phase{p}_epochs" in attrs or any(h.get("phase") == p for h in history)]
    if not phases:
        return []
    unfrozen = attrs.get("unfrozen_blocks") or []
    heads = {
        1: "phase 1: backbone frozen",
        2: f"phase 2: top {len(unfrozen)} block{'s' if len(unfrozen) != 1 else ''} unfrozen",
    }
    lines = ["| | " + " | ".join(heads[p] for p in phases) + " |", "| --- |" + " --- |" * len(phases)]
    rows = [
        ("steps", lambda p: _steps_text(history, p)),
        (f"best {objective}", lambda p: attrs.get(f"phase{p}_best")),
        ("trainable params", lambda p: attrs.get(f"phase{p}_trainable_params")),
        ("images/s", lambda p: attrs.get(f"phase{p}_images_per_second")),
        ("seconds", lambda p: attrs.get(f"phase{p}_seconds")),
    ]
    for label, get in rows:
        lines.append(f"| {label} | " + " | ".join(_md_cell(get(p)) for p in phases) + " |")
    return lines + [""]


def _pareto_line(pareto_with: list[str]) -> list[str]:
    """The note's line on more objectives, when the spec has them."""
    if not pareto_with:
        return []
    names = ", ".join(f"`{name}`" for name in pareto_with)
    return [
        f"- **several objectives**: also {names}; the best trials are a Pareto front (the best "
        "trial is its best on the main metric) and no trial is pruned (a pruner compares one value)"
    ]


def _constraints_line(constraints: Sequence[str]) -> list[str]:
    if not constraints:
        return []
    return [
        "- **constraints**: " + ", ".join(f"`{text}`" for text in constraints)
        + " on each trial's model; the best trial is the best one that keeps them (pruning uses the objective alone)"
    ]


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
