"""A keras-tuner search of a study: the tuner, its Ctrl-C, and how its end is recorded.

A keras-tuner tuner searches with :class:`~.hypermodel.TwoPhaseHyperModel` and every keras-tuner
trial is mirrored into the study database (:mod:`.mirror`), so ``status``, the dashboard and
``export`` serve it unchanged. The oracles that hand keras-tuner the study's queued trials and
stop at its budget are in :mod:`.oracles`; the project folder and its lock in :mod:`.project`.
Importing this module needs the extra (it raises
:class:`~.hypermodel.MissingKerasTunerError`); :mod:`.engine` imports it when a launch runs.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from typing import Any, Iterator

from autofinetune.engines.keras_tuner.hypermodel import TwoPhaseHyperModel, keras_tuner
from autofinetune.engines.keras_tuner.mirror import StudyMirror, last_line
from autofinetune.engines.keras_tuner.oracles import make_oracle, mirroring_tuner
from autofinetune.engines.keras_tuner.project import Project, keras_tuner_directory
from autofinetune.engines.keras_tuner.options import KerasTunerOptions
from autofinetune.errors import ConfigError, ExitCode

def launch_with_keras_tuner(spec, url: str, study, options: KerasTunerOptions | None = None) -> ExitCode:
    """Run a created (or resumed) study with a keras-tuner tuner, mirrored into the study database.

    The keras-tuner project lives beside the study database (:func:`keras_tuner_directory`, one
    folder per study) and is resumed when it exists. The study's queued trials (the baseline
    first) run before keras-tuner samples; the search stops when the study's trial budget is
    used (trials of every engine count), when ``deadline`` passes, or when keras-tuner has
    nothing new to try.

    Args:
        spec: The study's :class:`~autofinetune.spec.StudySpec`.
        url: The study database's SQLAlchemy URL.
        study: The Optuna study, created or resumed with the spec.
        options: The tuner, the deadline and where checkpoints go (default: Hyperband).

    Returns:
        ``DONE``; ``BAD_INPUT`` when the search stopped on an error (too many failed trials in
        a row, a spec that cannot train); ``INTERRUPTED`` (Ctrl-C; the running trial is failed
        with that reason and runs again on resume).

    Raises:
        ConfigError: an unknown tuner, a project searched by another process or with another
            tuner, or a space keras-tuner cannot express; nothing ran.
        FatalError: the data differs from the data the study started with.
    """
    import optuna

    from autofinetune.engines.progress import TrialProgressBar, progress_wanted
    from autofinetune.engines.trial_path import TrialRecording
    from autofinetune.store.artifacts import artifacts_location
    from autofinetune.store.study import load_study_data, study_budget

    options = options or KerasTunerOptions()
    options.check()
    if spec.objective.is_multi and options.tuner == "hyperband":
        raise ConfigError(
            "--tuner: got 'hyperband', which stops trials early (it prunes), and a study of several objectives "
            "(objective.pareto_with) prunes nothing; use --tuner random or --tuner bayesian"
        )
    tuner, deadline = options.tuner, options.deadline
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    # Retracing warnings are expected: every trial builds a new model.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    project = Project(keras_tuner_directory(url), spec.name, tuner)
    try:
        recording = TrialRecording.at(study, spec, artifacts=artifacts_location(url, options.artifacts))
        hypermodel = TwoPhaseHyperModel(spec, load_study_data(study, spec))
        hypermodel.recording = recording  # fit records each mirrored trial through the one trial path
        progress = TrialProgressBar(study, study_budget(study), enabled=progress_wanted(options.progress))
        mirror = StudyMirror(study, spec, recording, project, deadline=deadline, progress=progress)
        oracle = make_oracle(tuner, hypermodel, seed=spec.seed)
        ctrl_c = _CtrlC()
        hypermodel.stop_event = ctrl_c.event  # a trial stops after its current batch
        kt_tuner = mirroring_tuner(
            tuner, oracle=oracle, hypermodel=hypermodel, mirror=mirror, project=project, ctrl_c=ctrl_c
        )
        # keras-tuner replaced its oracle's state from the project on reload; the link to the
        # study is set afterwards, on the oracle it kept.
        kt_tuner.oracle.study_mirror = mirror
        # keras-tuner reloads a project only when its tuner file exists, and writes that file
        # first when a trial ends: a search stopped in its first trial would start over and
        # reuse that trial's id. Saved now, a resumed search runs the unfinished trial again.
        kt_tuner.save()
        mirror.recover(kt_tuner.oracle)
        try:
            with ctrl_c:
                return _search(kt_tuner, mirror)
        finally:
            progress.close()
    finally:
        project.close()


class _CtrlC:
    """Ctrl-C, raised as ``KeyboardInterrupt`` only where the search can stop cleanly.

    The handler raises nothing itself: an exception raised from a signal handler lands wherever
    the main thread is, inside a garbage-collection callback (where Python prints and drops it;
    with JAX installed one is registered, and the study then ran on to its end) or inside C
    code that does not expect it (seen: ``SystemError: Objects/listobject.c:338: bad argument
    to internal function`` recorded as the trial's failure). It sets :attr:`event`, which the
    trial checks after every batch (the schedule's ``stop_event``), and :meth:`check`, called at
    every trial start and epoch end, raises it.
    """

    def __init__(self) -> None:
        self.event = threading.Event()
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.event.set()

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` if Ctrl-C was pressed."""
        if self.event.is_set():
            raise KeyboardInterrupt

    def __enter__(self) -> "_CtrlC":
        # Only the main thread may set signal handlers; elsewhere Python's default stays.
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore Ctrl-C inside the block (only the main thread may change signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _search(kt_tuner, mirror: StudyMirror) -> ExitCode:
    """Run ``kt_tuner.search()``, turning how it ends into an exit code and trial records."""
    from autofinetune.store.outages import storage_unavailable

    try:
        kt_tuner.search(verbose=0)
    except KeyboardInterrupt:
        # A second Ctrl-C must not interrupt the bookkeeping of the first.
        with _sigint_ignored():
            _fail_open(mirror, "interrupted (Ctrl-C) while running")
        return ExitCode.INTERRUPTED
    except BaseException as error:
        unavailable = storage_unavailable(error)
        if unavailable is not None:
            # Nothing can be recorded now; the open trials are ended when the study resumes.
            print(f"error: {unavailable}", file=sys.stderr, flush=True)
            return ExitCode.DATABASE_UNREACHABLE
        if isinstance(error, keras_tuner.errors.FatalError):
            _fail_open(mirror, f"the search stopped: {error}")
            print(f"error: {error}", file=sys.stderr, flush=True)
            return ExitCode.BAD_INPUT
        if isinstance(error, RuntimeError):  # keras-tuner's "Number of consecutive failures exceeded ..."
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            _fail_open(mirror, f"the search stopped: {reason}")
            last = last_line(str(error))
            print(f"error: keras-tuner stopped the search: {reason}" + (f" (last: {last})" if last != reason else ""),
                  file=sys.stderr, flush=True)
            return ExitCode.BAD_INPUT
        _fail_open(mirror, f"the search stopped: {type(error).__name__}: {error}")
        raise
    if mirror.stop_reason is None:
        print("keras-tuner has no new hyperparameters to try (its search space is exhausted)", flush=True)
    return ExitCode.DONE


def _fail_open(mirror: StudyMirror, reason: str) -> None:
    """Fail the trials the stopped search left open; an unreachable database leaves them to
    the next launch (which ends them as a killed search's)."""
    from autofinetune.store.outages import StorageUnavailableError

    try:
        mirror.fail_open(reason)
    except StorageUnavailableError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)


__all__ = ["launch_with_keras_tuner"]
