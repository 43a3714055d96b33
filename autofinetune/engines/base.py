"""The engine contract: what `launch` needs from Optuna, Ray Tune or keras-tuner, and the registry.

An engine decides how trials get their params and when they run; everything a trial records
goes through the one trial path (:mod:`autofinetune.engines.trial_path`), the same for every engine.
A new engine is a subclass of :class:`Engine` in its own package under ``engines/``, with its
options in one frozen dataclass, and one line in :data:`ENGINES`.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, ClassVar

from autofinetune.errors import ConfigError, ExitCode


@dataclass(frozen=True)
class EngineOptions:
    """What every engine's launch takes; each engine's options extend it.

    Attributes:
        deadline: Unix time after which no new trial starts (``--timeout``).
        artifacts: Where checkpoints and curves go (see
            :func:`~autofinetune.store.database.artifacts_location`); ``None``: beside the database.
        progress: Draw a bar of the study's trials; ``None``: on a terminal or in a notebook
            (see :func:`~autofinetune.engines.progress.progress_wanted`).
    """

    deadline: float | None = None
    artifacts: str | None = None
    progress: bool | None = None


class EarlyStart(abc.ABC):
    """What an engine started before the study existed (:meth:`Engine.start_early`)."""

    @abc.abstractmethod
    def cancel(self) -> None:
        """Stop what :meth:`Engine.launch` has not taken over; nothing else."""


class Engine(abc.ABC):
    """Runs a study's missing trials into its study database.

    Subclasses set :attr:`name`, :attr:`extra` and :attr:`options_type`, and implement
    :meth:`check` and :meth:`launch`. ``launch`` in the CLI calls ``check`` first, then
    :meth:`start_early`, then checks the images and trackers and creates (or resumes) the study,
    then calls ``launch`` with what ``start_early`` returned.
    """

    #: The ``--engine`` name.
    name: ClassVar[str]
    #: The pip extra the engine needs (``pip install 'autofinetune[EXTRA]'``), or ``None``.
    extra: ClassVar[str | None] = None
    #: The frozen dataclass of the engine's options.
    options_type: ClassVar[type[EngineOptions]] = EngineOptions

    @abc.abstractmethod
    def check(self, spec, options: EngineOptions) -> None:
        """Refuse what cannot run, before the study database is touched.

        Raises:
            ConfigError: the engine's package is missing (naming the extra), an option is
                invalid, or the spec asks for something the engine cannot do.
        """

    def start_early(self, spec, url: str, options: EngineOptions) -> "EarlyStart | None":
        """Start what can start before the study exists, or ``None`` (the default: nothing).

        Called after :meth:`check`; its result goes to :meth:`launch`, and is cancelled when
        the launch is refused before that.
        """
        return None

    @abc.abstractmethod
    def launch(self, spec, url: str, study, options: EngineOptions, early: "EarlyStart | None" = None) -> ExitCode:
        """Run the study's missing trials; ``study`` exists (created or resumed, baseline queued).

        Args:
            spec: The study's spec.
            url: The study database's URL.
            study: The Optuna study.
            options: The engine's options (an instance of :attr:`options_type`).
            early: What :meth:`start_early` started.

        Returns:
            ``DONE``, ``BAD_INPUT`` (a fatal error stopped the search) or ``INTERRUPTED``.
        """

    def make_options(self, **values: Any) -> EngineOptions:
        """The engine's options from command-line values.

        Values of options this engine does not have (another engine's flags) are left out, and
        ``None`` keeps an option's default.
        """
        names = {field.name for field in dataclasses.fields(self.options_type)}
        return self.options_type(**{key: value for key, value in values.items() if key in names and value is not None})


#: ``--engine`` name -> ``"module:Class"``. Imported on first use: Ray and keras-tuner are
#: optional, and importing them costs seconds.
ENGINES: dict[str, str] = {
    "optuna": "autofinetune.engines.optuna.engine:OptunaEngine",
    "ray": "autofinetune.engines.ray.engine:RayEngine",
    "keras-tuner": "autofinetune.engines.keras_tuner.engine:KerasTunerEngine",
}


def get_engine(name: str) -> Engine:
    """The engine registered as ``name``.

    Raises:
        ConfigError: no engine has that name (the message lists those that do), or the
            engine's optional package is missing (the message names the extra).
    """
    target = ENGINES.get(name)
    if target is None:
        raise ConfigError(f"--engine: got {name!r}; allowed: {', '.join(ENGINES)}")
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)()
