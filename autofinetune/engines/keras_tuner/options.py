"""The keras-tuner engine's options: which tuner searches (no keras-tuner import here)."""

from __future__ import annotations

from dataclasses import dataclass

from autofinetune.engines.base import EngineOptions, option
from autofinetune.errors import ConfigError

#: ``--tuner`` names.
TUNERS = ("hyperband", "bayesian", "random")


@dataclass(frozen=True)
class KerasTunerOptions(EngineOptions):
    """Options of the keras-tuner engine.

    Attributes:
        tuner: ``"hyperband"`` (budget: the epochs of both phases), ``"bayesian"`` or ``"random"``.
    """

    tuner: str = option("hyperband", choices=TUNERS, help="Which keras-tuner tuner searches.")

    def check(self) -> None:
        """Raises ConfigError naming the option, the value and what is allowed."""
        if self.tuner not in TUNERS:
            raise ConfigError(f"--tuner: got {self.tuner!r}; allowed: {', '.join(TUNERS)}")
