"""autofinetune: search the two-phase ResNet50 fine-tuning schedule into an Optuna study database.

Public names are listed in ``__all__``; heavy modules (Keras, the engines) load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from autofinetune.spec import StudySpec, load_spec, parse_spec
from autofinetune.errors import ConfigError, FatalError, PruneTrial, TrialError
from autofinetune.trial.results import EpochRecord, PhaseSummary, TrialResult

__version__ = "0.1.0"

#: Public names whose modules load on first access (they import optional, heavy packages).
_LAZY = {
    "TwoPhaseHyperModel": "autofinetune.engines.keras_tuner.hypermodel",
}

__all__ = [
    "ConfigError",
    "EpochRecord",
    "FatalError",
    "PhaseSummary",
    "PruneTrial",
    "StudySpec",
    "TrialError",
    "TrialResult",
    "TwoPhaseHyperModel",
    "load_spec",
    "parse_spec",
]


def __getattr__(name: str) -> Any:
    # PEP 562: `import autofinetune` stays light; keras_tuner is imported only when the
    # HyperModel is asked for, and a missing extra raises then, naming it.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'autofinetune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
