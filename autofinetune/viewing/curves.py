"""A trial's learning curve as a self-contained SVG: both phases on one global step axis.

A pure function of the per-epoch history a trial records, so the same picture comes out
whichever engine ran the trial. Nothing here imports Optuna, optuna-dashboard or Keras.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

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
    series = _series(history, objective)
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
    frame = _Frame.around(steps, [v for _, _, _, points in series for _, v in points])
    if boundary_step is not None:
        out += _phase_shading(frame, boundary_step)
    out += _axes(frame, steps)
    for _, colour, dash, points in series:
        out += _curve(frame, points, colour, dash)
    objective_points = dict(series[0][3]) if series[0][0] == objective else {}
    legend = [(metric, colour, dash) for metric, colour, dash, _ in series]
    if best_step is not None and best_step in objective_points:
        x, y = frame.x_of(best_step), frame.y_of(objective_points[best_step])
        out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="7" fill="none" stroke="#2ca02c" stroke-width="2"/>')
        legend.append((f"best {objective} (step {best_step})", "#2ca02c", "ring"))
    if pruned_at_step is not None and pruned_at_step in objective_points:
        out += _pruned_cross(frame.x_of(pruned_at_step), frame.y_of(objective_points[pruned_at_step]))
    out += _legend(legend)
    return "\n".join(out + ["</svg>"]) + "\n"


def _series(history: Sequence[Mapping[str, Any]], objective: str) -> list[tuple[str, str, str, list[tuple[int, float]]]]:
    """(metric, colour, dash, finite points) of the objective and its twin, where recorded."""
    series = []
    for metric, colour, dash in ((objective, "#1f77b4", ""), (companion_metric(objective), "#ff7f0e", "6 4")):
        points = [
            (int(h["step"]), float(h[metric]))
            for h in history
            if isinstance(h.get(metric), (int, float)) and math.isfinite(h[metric])
        ]
        if points:
            series.append((metric, colour, dash, points))
    return series


@dataclass(frozen=True)
class _Frame:
    """The plot area and the steps and values it spans."""

    x_lo: float
    x_hi: float
    y_lo: float
    y_hi: float
    width: float = _WIDTH - _LEFT - _RIGHT
    height: float = _HEIGHT - _TOP - _BOTTOM

    @classmethod
    def around(cls, steps: Sequence[int], values: Sequence[float]) -> "_Frame":
        x_lo, x_hi = min(steps), max(steps)
        if x_lo == x_hi:
            x_lo, x_hi = x_lo - 1, x_hi + 1
        return cls(x_lo, x_hi, *_padded_range(min(values), max(values)))

    def x_of(self, step: float) -> float:
        return _LEFT + (step - self.x_lo) / (self.x_hi - self.x_lo) * self.width

    def y_of(self, value: float) -> float:
        return _TOP + (1 - (value - self.y_lo) / (self.y_hi - self.y_lo)) * self.height


def _phase_shading(frame: _Frame, boundary_step: int) -> list[str]:
    """Phase 1 shaded, the boundary half-way between its last step and phase 2's first."""
    if not frame.x_lo <= boundary_step + 0.5 <= frame.x_hi:
        return []
    edge = frame.x_of(boundary_step + 0.5)
    out = [
        f'<rect x="{_LEFT}" y="{_TOP}" width="{edge - _LEFT:.1f}" height="{frame.height}" fill="#f2f2f2"/>',
        f'<line x1="{edge:.1f}" y1="{_TOP}" x2="{edge:.1f}" y2="{_TOP + frame.height}" stroke="#555" '
        'stroke-dasharray="4 3"/>',
        f'<text x="{(_LEFT + edge) / 2:.1f}" y="{_TOP + 14}" text-anchor="middle" fill="#555">phase 1</text>',
    ]
    if edge < _LEFT + frame.width - 20:
        out.append(
            f'<text x="{(edge + _LEFT + frame.width) / 2:.1f}" y="{_TOP + 14}" text-anchor="middle" '
            'fill="#555">phase 2</text>'
        )
    return out


def _axes(frame: _Frame, steps: Sequence[int]) -> list[str]:
    """The plot's border, value grid and ticks, and step ticks (at most about 20)."""
    bottom = _TOP + frame.height
    out = [f'<rect x="{_LEFT}" y="{_TOP}" width="{frame.width}" height="{frame.height}" fill="none" stroke="#999"/>']
    for tick in _ticks(frame.y_lo, frame.y_hi):
        y = frame.y_of(tick)
        out.append(f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{_LEFT + frame.width}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{tick:.3g}</text>')
    stride = max(1, math.ceil(len(set(steps)) / 20))
    for step in sorted(set(steps))[::stride]:
        x = frame.x_of(step)
        out.append(f'<line x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 4}" stroke="#999"/>')
        out.append(f'<text x="{x:.1f}" y="{bottom + 17}" text-anchor="middle">{step}</text>')
    out.append(f'<text x="{_LEFT + frame.width / 2}" y="{_HEIGHT - 8}" text-anchor="middle">step (epoch, both phases)</text>')
    return out


def _curve(frame: _Frame, points: Sequence[tuple[int, float]], colour: str, dash: str) -> list[str]:
    path = " ".join(f"{frame.x_of(s):.1f},{frame.y_of(v):.1f}" for s, v in points)
    dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
    out = [f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash_attr}/>']
    out += [f'<circle cx="{frame.x_of(s):.1f}" cy="{frame.y_of(v):.1f}" r="2.5" fill="{colour}"/>' for s, v in points]
    return out


def _pruned_cross(x: float, y: float) -> list[str]:
    return [
        f'<path d="M{x - 6:.1f},{y - 6:.1f} L{x + 6:.1f},{y + 6:.1f} M{x - 6:.1f},{y + 6:.1f} '
        f'L{x + 6:.1f},{y - 6:.1f}" stroke="#d62728" stroke-width="2"/>',
        f'<text x="{x - 8:.1f}" y="{y + 18:.1f}" text-anchor="end" fill="#d62728">pruned</text>',
    ]


def _legend(entries: Sequence[tuple[str, str, str]]) -> list[str]:
    """One row between the title and the plot, so it never hides a curve."""
    out = []
    x, y = float(_LEFT), 40.0
    for label, colour, dash in entries:
        if dash == "ring":
            out.append(f'<circle cx="{x + 11}" cy="{y - 4}" r="5" fill="none" stroke="{colour}" stroke-width="2"/>')
        else:
            dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
            out.append(f'<line x1="{x}" y1="{y - 4}" x2="{x + 22}" y2="{y - 4}" stroke="{colour}" stroke-width="2"{dash_attr}/>')
        out.append(f'<text x="{x + 28}" y="{y}">{html.escape(label)}</text>')
        x += 28 + 7 * len(label) + 18
    return out


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
