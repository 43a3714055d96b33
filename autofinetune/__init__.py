"""autofinetune: search the two-phase ResNet50 fine-tuning schedule into an Optuna study database.

Public names are listed in ``__all__``; heavy modules (Keras, the engines) load on first use.
"""

from autofinetune.config import StudySpec, load_spec, parse_spec
from autofinetune.errors import ConfigError, FatalError, PruneTrial, TrialError
from autofinetune.results import EpochRecord, PhaseSummary, TrialResult

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "EpochRecord",
    "FatalError",
    "PhaseSummary",
    "PruneTrial",
    "StudySpec",
    "TrialError",
    "TrialResult",
    "load_spec",
    "parse_spec",
]
