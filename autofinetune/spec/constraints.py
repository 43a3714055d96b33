"""Limits on the trial's model that the search must keep: ``objective.constraints``.

A constraint is written ``"latency_ms <= 15"``: a measure of the trial's model, ``<=`` or
``>=``, and a number. The measures (:data:`MEASURES`) are taken on the trial's classifier by
:mod:`autofinetune.trial.constraints` on the machine that ran the trial. Each constraint gives
the trial a violation (``measure - bound`` for ``<=``, ``bound - measure`` for ``>=``): a trial
is feasible when every violation is at most 0, as Optuna's constrained samplers count it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

#: What a constraint can limit, and what it is.
MEASURES = {
    "params": "parameters of the classifier (backbone and head)",
    "size_mb": "megabytes of the classifier saved as a .keras file (what `export` writes)",
    "latency_ms": "median milliseconds to classify one image on the machine that ran the trial",
}

#: Trial user attributes: each measure of the trial's model (``{"latency_ms": 12.3, ...}``), and
#: its violation of each constraint, in the spec's order.
CONSTRAINT_MEASURES_ATTR = "constraint_measures"
CONSTRAINT_VIOLATIONS_ATTR = "constraint_violations"

_FORM = re.compile(r"^\s*(?P<measure>[a-z_]+)\s*(?P<op><=|>=)\s*(?P<bound>[-+0-9.eE_]+)\s*$")


def feasible(violations: Iterable[float]) -> bool:
    """Whether every violation is at most 0: the rule of Optuna's constrained samplers and
    ``Study.best_trial``, and of every best trial autofinetune picks."""
    return all(value <= 0 for value in violations)


@dataclass(frozen=True)
class Constraint:
    """One limit: ``measure op bound``."""

    measure: str
    op: Literal["<=", ">="]
    bound: float

    def violation(self, value: float) -> float:
        """How far ``value`` is past the bound; at most 0 when the constraint holds."""
        return value - self.bound if self.op == "<=" else self.bound - value

    def __str__(self) -> str:
        return f"{self.measure} {self.op} {self.bound:g}"


def parse_constraint(text: str) -> Constraint:
    """``"latency_ms <= 15"`` -> a :class:`Constraint`.

    Raises:
        ValueError: not of that form, an unknown measure, or a bound that is not a finite number.
    """
    match = _FORM.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{text!r} is not a constraint; write 'MEASURE <= NUMBER' or 'MEASURE >= NUMBER'")
    measure, op, bound_text = match["measure"], match["op"], match["bound"]
    if measure not in MEASURES:
        raise ValueError(f"{text!r}: unknown measure {measure!r}; allowed: {', '.join(MEASURES)}")
    try:
        bound = float(bound_text)
    except ValueError:
        raise ValueError(f"{text!r}: the bound {bound_text!r} is not a number") from None
    if not math.isfinite(bound):
        raise ValueError(f"{text!r}: the bound must be a finite number")
    return Constraint(measure, "<=" if op == "<=" else ">=", bound)
