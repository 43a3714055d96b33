"""The keras-tuner engine: ``autofinetune launch STUDY.toml --engine keras-tuner --tuner NAME``.

A keras-tuner tuner searches the study with the two-phase schedule as its HyperModel, and every
keras-tuner trial is mirrored into the study database (see :mod:`.search`). This module is cheap
to import: keras-tuner (and Keras) load when the engine checks or launches, and a missing extra
is reported then, naming it.
"""

from __future__ import annotations

from autofinetune.engines.base import EarlyStart, Engine
from autofinetune.engines.keras_tuner.options import TUNERS, KerasTunerOptions
from autofinetune.errors import ExitCode


class KerasTunerEngine(Engine[KerasTunerOptions]):
    """A keras-tuner tuner searches; its trials are mirrored into the study (``--engine keras-tuner``)."""

    name = "keras-tuner"
    extra = "keras-tuner"
    options_type = KerasTunerOptions

    def check(self, spec, options: KerasTunerOptions) -> None:
        options.check()
        # Raises MissingKerasTunerError (a ConfigError naming the extra) without keras-tuner.
        from autofinetune.engines.keras_tuner.hypermodel import keras_tuner, require_tensorboard
        from autofinetune.engines.keras_tuner.space import keras_tuner_params

        require_tensorboard()
        keras_tuner_params(keras_tuner.HyperParameters(), spec)  # the space must translate

    def launch(self, spec, url: str, study, options: KerasTunerOptions, early: EarlyStart | None = None) -> ExitCode:
        from autofinetune.engines.keras_tuner.search import launch_with_keras_tuner
        from autofinetune.trial.devices import prepare_devices

        prepare_devices()  # keras-tuner trains in this process
        return launch_with_keras_tuner(spec, url, study, options)


__all__ = ["KerasTunerEngine", "KerasTunerOptions", "TUNERS"]
