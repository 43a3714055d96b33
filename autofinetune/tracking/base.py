"""The tracker contract, the set of a spec's trackers, and the reachability check of ``launch``.

A tracker hears a trial's start, each of its epochs (on the global step across both phases),
its end, and the end of a study. A tracker that fails while a study runs is reported once (a
warning) and left off for the rest of that process: logging never fails a trial.
"""

from __future__ import annotations

import abc
import logging
import socket
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from autofinetune.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrialInfo:
    """What a tracker knows of a trial when its run starts.

    Attributes:
        study: The study's name.
        number: The trial's number in the study.
        params: The trial's parameters.
        phase_boundary_step: The last step of phase 1; phase 2's epochs follow it.
        study_uid: The study's stable id (:func:`~autofinetune.store.study.study_uid`): two
            studies of one name, in two study databases, never share a run.
        spec: The study's spec, flattened (``{"data.image_size": 32, ...}``).
    """

    study: str
    number: int
    params: Mapping[str, Any] = field(default_factory=dict)
    phase_boundary_step: int = 0
    study_uid: str = ""
    spec: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StudyInfo:
    """What a tracker knows of a study when a launch starts (or resumes) it.

    Attributes:
        name: The study's name.
        uid: Its stable id.
        spec: Its spec, flattened (storage and tracking left out: they may hold secrets).
        engine: The engine that runs the trials (``optuna``, ``ray``, ``keras-tuner``).
    """

    name: str
    uid: str
    spec: Mapping[str, Any]
    engine: str


@dataclass(frozen=True)
class StudyEnd:
    """How a launch ended, for the study's run.

    Attributes:
        status: ``"FINISHED"``, ``"FAILED"`` or ``"KILLED"`` (Ctrl-C), as MLflow names them.
        best_number: The best trial's number, if any trial completed.
        best_value: Its objective value.
        test_score: Its model's score on the held-back test split (``{"trial", "images",
            "accuracy", "loss"}``), when the spec holds images back.
        best_model: Its model (a Keras model: raw images in, probabilities out), when a tracker
            keeps models and the trial kept its checkpoint; trackers never import Keras.
    """

    status: str
    best_number: int | None = None
    best_value: float | None = None
    test_score: Mapping[str, Any] | None = None
    best_model: Any = None


def flatten_spec(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A spec's TOML data as one level of dotted keys (``{"data.image_size": 32}``); lists
    and ranges become their text, so every value is a scalar a tracker can log."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and not {"low", "high"} <= set(value):
            flat.update(flatten_spec(value, prefix=f"{name}."))
        elif isinstance(value, (Mapping, list, tuple)):
            flat[name] = str(dict(value) if isinstance(value, Mapping) else list(value))
        else:
            flat[name] = value
    return flat


class Tracker(abc.ABC):
    """One experiment tracker, for one study, in one process.

    ``launch`` calls :meth:`start_study` once the study exists, and :meth:`end_study` when it
    returns; in between, in whichever process runs it, each trial gets :meth:`start_trial`,
    :meth:`log_epoch` per epoch and :meth:`end_trial`. A tracker finds the study's records by its
    stable id, so two studies of one name never share one. Methods may raise anything:
    :class:`TrackerSet` turns a failure into one warning.
    """

    #: The tracker's name in ``[tracking]`` and its ``launch`` flag (``--NAME``).
    name: ClassVar[str]
    #: The pip extra that installs the tracker's package.
    extra: ClassVar[str]

    @property
    def where(self) -> str:
        """The flag and field that configured the tracker, for error messages."""
        return f"--{self.name} / tracking.{self.name}"

    @abc.abstractmethod
    def check(self) -> None:
        """Reach the tracker before any trial runs.

        Raises:
            ConfigError: the package is missing (naming the extra) or the tracker cannot be
                reached (naming :attr:`where` and the URI).
        """

    @abc.abstractmethod
    def start_trial(self, trial: TrialInfo) -> None:
        """Open the trial's run and log its parameters and phase boundary."""

    @abc.abstractmethod
    def log_epoch(self, number: int, step: int, metrics: Mapping[str, float], *, phase: int) -> None:
        """Log one epoch's metrics at the trial's global 1-based step."""

    @abc.abstractmethod
    def end_trial(
        self, number: int, *, state: str, value: float | None, reason: str | None, checkpoint: str | None
    ) -> None:
        """Close the trial's run.

        Args:
            number: The trial's number.
            state: ``"COMPLETE"``, ``"PRUNED"`` or ``"FAIL"``.
            value: The objective value of a complete trial.
            reason: Why it failed (or why its schedule stopped it), else ``None``.
            checkpoint: The trial's kept model file, else ``None``.
        """

    def start_study(self, study: StudyInfo) -> None:
        """Open (or reopen, on resume) the study's own record: ``launch`` calls it once the
        study exists, before any trial runs; trials started elsewhere find it by the study's id."""

    def end_study(self, end: StudyEnd) -> None:
        """Close the study's record with how the launch ended and its best trial (called once
        a launch returns)."""

    def import_package(self, module: str):
        """Import the tracker's package, or raise a ConfigError naming the extra."""
        import importlib

        try:
            return importlib.import_module(module)
        except ImportError as error:
            raise ConfigError(
                f"{self.where}: the {module} package is missing ({error}); install it with "
                f"`pip install 'autofinetune[{self.extra}]'`"
            ) from None


class TrackerSet:
    """The trackers of one spec, each guarded: a failure is warned about once, then it is off.

    Args:
        trackers: The trackers.
    """

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = list(trackers)
        self._broken: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[str]:
        """Call ``method`` on every tracker still working; never raises.

        Returns:
            A warning for each tracker that failed now or was left off after an earlier failure
            (so what a trial's run misses is said on the trial).
        """
        warnings: list[str] = []
        for tracker in self.trackers:
            if tracker.name in self._broken:
                warnings.append(f"tracker {tracker.where} is off in this process since it failed")
                continue
            try:
                getattr(tracker, method)(*args, **kwargs)
            except Exception as error:  # a tracker must never fail a trial
                self._broken.add(tracker.name)
                text = str(error).splitlines()[0][:300] if str(error) else ""
                logger.warning(
                    "tracker %s failed (%s: %s); it logs nothing more from this process, the trials go on",
                    tracker.where, type(error).__name__, text,
                )
                warnings.append(f"tracker {tracker.where} failed: {type(error).__name__}: {text}")
        return warnings


def check_reachable(url: str, *, where: str, timeout: float = 5.0) -> None:
    """Open (and close) a TCP connection to an http(s) URL's host and port.

    Raises:
        ConfigError: naming ``where`` and the URL, when nothing answers there.
    """
    parts = urllib.parse.urlsplit(url)
    shown = redact(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout):
            pass
    except OSError as error:
        raise ConfigError(
            f"{where}: cannot reach {shown} ({error.strerror or error}); start the tracking server, fix the "
            "address, or leave the tracker out"
        ) from None


def redact(url: str) -> str:
    """The URL with its password (if any) replaced by ``***``: URLs appear in logs and errors."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
