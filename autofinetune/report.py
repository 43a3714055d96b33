"""Plain-text tables of trials for the terminal."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from autofinetune.results import TrialResult


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
