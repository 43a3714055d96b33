"""The engine contract: what `launch` needs from Optuna, Ray Tune or keras-tuner, and the registry.

An engine decides how trials get their params and when they run; everything a trial records
goes through the one trial path (:mod:`autofinetune.engines.trial_path`), the same for every
engine. A new engine is a package under ``engines/`` holding a subclass of :class:`Engine` (its
module cheap to import: heavy packages load inside its methods), its options in one frozen
dataclass whose fields are :func:`option`\\ s (``autofinetune launch`` makes its flags from them),
and one line in :data:`ENGINES` (or a :func:`register_engine` call).
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Iterator, Mapping, TypeVar

from autofinetune.errors import ConfigError, ExitCode

#: Where an engine option's command-line form sits in its field's metadata.
_FLAG = "autofinetune.flag"


@dataclass(frozen=True)
class CommandLineOption:
    """How an engine option appears on ``autofinetune launch``.

    Attributes:
        help: One line for ``--help`` (the engine's name and the default are added).
        flag: The flag; ``None``: ``--`` and the field's name with dashes.
        kind: The value's type (``str``, ``int``, ``float``).
        metavar: The value's name in ``--help``.
        choices: The values allowed, when they are a fixed few.
        minimum: The smallest value allowed, for numbers.
    """

    help: str
    flag: str | None = None
    kind: type = str
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    minimum: float | None = None


def option(default: Any = None, **command_line: Any) -> Any:
    """A field of an engine's options dataclass, with its command-line flag.

    Args:
        default: The value when neither the command line nor the caller gives one.
        **command_line: See :class:`CommandLineOption` (``help`` is required).
    """
    return dataclasses.field(default=default, metadata={_FLAG: CommandLineOption(**command_line)})


def command_line_options(options_type: type) -> Iterator[tuple[str, CommandLineOption]]:
    """``(field name, its command-line form)`` of every option of an options dataclass that has
    a flag (``deadline`` and ``progress`` have none: ``--timeout`` and the terminal set them)."""
    for spec in dataclasses.fields(options_type):
        found = spec.metadata.get(_FLAG)
        if found is not None:
            flag = found.flag or f"--{spec.name.replace('_', '-')}"
            yield spec.name, dataclasses.replace(found, flag=flag)


@dataclass(frozen=True)
class EngineOptions:
    """What every engine's launch takes; each engine's options extend it.

    Attributes:
        deadline: Unix time after which no new trial starts (``--timeout``).
        artifacts: Where checkpoints and curves go (see
            :func:`~autofinetune.store.artifacts.artifacts_location`); ``None``: beside the database.
        progress: Draw a bar of the study's trials; ``None``: on a terminal or in a notebook
            (see :func:`~autofinetune.engines.progress.progress_wanted`).
    """

    deadline: float | None = None
    artifacts: str | None = option(
        None, metavar="DIR_OR_URL",
        help="Where trial checkpoints go [default: beside a SQLite database, else ./autofinetune-artifacts].",
    )
    progress: bool | None = None


class EarlyStart(abc.ABC):
    """What an engine started before the study existed (:meth:`Engine.start_early`)."""

    @abc.abstractmethod
    def cancel(self) -> None:
        """Stop what :meth:`Engine.launch` has not taken over; nothing else."""


#: An engine's options dataclass.
OptionsT = TypeVar("OptionsT", bound=EngineOptions)


class Engine(abc.ABC, Generic[OptionsT]):
    """Runs a study's missing trials into its study database.

    Generic over its options dataclass (``class MyEngine(Engine[MyOptions])``). Subclasses set :attr:`name`, :attr:`extra` and :attr:`options_type`, and implement
    :meth:`check` and :meth:`launch`. ``launch`` in the CLI calls ``check`` first, then
    :meth:`start_early`, then checks the images and trackers and creates (or resumes) the study,
    then calls ``launch`` with what ``start_early`` returned.
    """

    #: The ``--engine`` name.
    name: ClassVar[str]
    #: The pip extra the engine needs (``pip install 'autofinetune[EXTRA]'``), or ``None``.
    extra: ClassVar[str | None] = None
    #: The frozen dataclass of the engine's options (its fields: :func:`option`).
    options_type: ClassVar[type[EngineOptions]] = EngineOptions

    @abc.abstractmethod
    def check(self, spec, options: OptionsT) -> None:
        """Refuse what cannot run, before the study database is touched.

        Raises:
            ConfigError: the engine's package is missing (naming the extra), an option is
                invalid, or the spec asks for something the engine cannot do.
        """

    def start_early(self, spec, url: str, options: OptionsT) -> "EarlyStart | None":
        """Start what can start before the study exists, or ``None`` (the default: nothing).

        Called after :meth:`check`; its result goes to :meth:`launch`, and is cancelled when
        the launch is refused before that.
        """
        return None

    @abc.abstractmethod
    def launch(self, spec, url: str, study, options: OptionsT, early: "EarlyStart | None" = None) -> ExitCode:
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
        """The engine's options; ``None`` keeps an option's default.

        Raises:
            TypeError: a value names no option of this engine.
        """
        names = {spec.name for spec in dataclasses.fields(self.options_type)}
        unknown = sorted(key for key, value in values.items() if key not in names and value is not None)
        if unknown:
            raise TypeError(
                f"the {self.name} engine takes no option {unknown[0]!r}; it takes: {', '.join(sorted(names))}"
            )
        return self.options_type(**{key: value for key, value in values.items() if value is not None})


#: ``--engine`` name -> ``"module:Class"``. Imported on first use: Ray and keras-tuner are
#: optional, and importing them costs seconds.
ENGINES: dict[str, str] = {
    "optuna": "autofinetune.engines.optuna.engine:OptunaEngine",
    "ray": "autofinetune.engines.ray.engine:RayEngine",
    "keras-tuner": "autofinetune.engines.keras_tuner.engine:KerasTunerEngine",
}
#: The engines the package registers itself.
BUILT_IN_ENGINES = frozenset(ENGINES)


def register_engine(name: str, target: str) -> None:
    """Make an engine available as ``launch(..., engine=name)``: ``target`` is ``"module:Class"``
    of its :class:`Engine` subclass (what a line of :data:`ENGINES` says).

    Raises:
        ConfigError: the name is taken by another engine.
    """
    if ENGINES.get(name, target) != target:
        raise ConfigError(f"engine {name!r} is registered already ({ENGINES[name]}); choose another name")
    ENGINES[name] = target


def unregister_engine(name: str) -> None:
    """Remove an engine added with :func:`register_engine` (the built-in ones stay).

    Raises:
        ConfigError: ``name`` is a built-in engine.
    """
    if name in BUILT_IN_ENGINES:
        raise ConfigError(f"engine {name!r} is built in and cannot be unregistered")
    ENGINES.pop(name, None)


def engine_class(name: str) -> type[Engine[Any]]:
    """The class of the engine registered as ``name`` (its module is cheap to import).

    Raises:
        ConfigError: no engine has that name (the message lists those that do).
    """
    target = ENGINES.get(name)
    if target is None:
        raise ConfigError(f"--engine: got {name!r}; allowed: {', '.join(ENGINES)}")
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def get_engine(name: str) -> Engine[Any]:
    """The engine registered as ``name``.

    Raises:
        ConfigError: no engine has that name (the message lists those that do).
    """
    return engine_class(name)()


def engine_options(name: str, values: Mapping[str, Any]) -> EngineOptions:
    """The options of engine ``name`` from keyword values (``launch``'s ``**engine_options``,
    the command line's flags); ``None`` keeps an option's default.

    Raises:
        ConfigError: a value belongs to another engine's options (naming its flag and engine).
        TypeError: a value names no engine's option.
    """
    chosen = get_engine(name)
    own = {spec.name for spec in dataclasses.fields(chosen.options_type)}
    for key, value in values.items():
        if value is None or key in own:
            continue
        for other in ENGINES:
            if other != name and key in {spec.name for spec in dataclasses.fields(engine_class(other).options_type)}:
                flags = ", ".join(flag for _, flag in _flags(chosen.options_type)) or "no option of its own"
                raise ConfigError(
                    f"{_flag_of(engine_class(other).options_type, key)} belongs to the {other} engine; "
                    f"--engine {name} takes {flags}"
                )
        raise TypeError(f"launch() got an unexpected engine option {key!r}; the {name} engine takes: {', '.join(sorted(own))}")
    return chosen.make_options(**values)


def _flags(options_type: type) -> Iterator[tuple[str, str]]:
    for field_name, found in command_line_options(options_type):
        if field_name not in {spec.name for spec in dataclasses.fields(EngineOptions)}:
            yield field_name, str(found.flag)


def _flag_of(options_type: type, field_name: str) -> str:
    return dict(_flags(options_type)).get(field_name, field_name)
