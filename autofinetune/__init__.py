"""autofinetune: search the two-phase ResNet50 fine-tuning schedule into an Optuna study database.

Public names are listed in ``__all__``; heavy modules (Keras, the engines) load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from autofinetune.spec import StudySpec, load_spec, parse_spec
from autofinetune.errors import ConfigError, FatalError, PruneTrial, TrialError
from autofinetune.trial.results import EpochRecord, PhaseSummary, TrialResult

if TYPE_CHECKING:
    # What a type checker sees for the names loaded on first use: their real signatures.
    from autofinetune.api import Objective, launch, objective
    from autofinetune.engines.keras_tuner.hypermodel import TwoPhaseHyperModel
    from autofinetune.trial.schedule import run_trial

__version__ = "0.1.0"

#: Public names whose modules load on first access (they import optional, heavy packages).
_LAZY = {
    "Objective": "autofinetune.api",
    "TwoPhaseHyperModel": "autofinetune.engines.keras_tuner.hypermodel",
    "launch": "autofinetune.api",
    "objective": "autofinetune.api",
    "run_trial": "autofinetune.trial.schedule",
}

__all__ = [
    "ConfigError",
    "EpochRecord",
    "FatalError",
    "Objective",
    "PhaseSummary",
    "PruneTrial",
    "StudySpec",
    "TrialError",
    "TrialResult",
    "TwoPhaseHyperModel",
    "launch",
    "load_spec",
    "objective",
    "parse_spec",
    "run_trial",
]


def __getattr__(name: str) -> Any:
    # PEP 562: `import autofinetune` stays light; Keras, the engines and keras_tuner are
    # imported only when a name that needs them is asked for (a missing extra raises then).
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'autofinetune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
