"""keras-tuner's oracles and tuners, tied to a study: its queue, its budget, its mirror."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from autofinetune.engines.keras_tuner.hypermodel import TwoPhaseHyperModel, keras_tuner
from autofinetune.engines.keras_tuner.mirror import StudyMirror
from autofinetune.engines.keras_tuner.project import Project

#: Hyperband's reduction factor (keras-tuner's default): a third of each round is promoted.
HYPERBAND_FACTOR = 3

#: keras-tuner stops the search after this many failed trials in a row. A NaN loss fails a
#: trial too (an aggressive learning-rate range can produce a few in a row), so this is more
#: than the Optuna engine's three unexpected errors; five in a row means something is broken.
MAX_CONSECUTIVE_FAILED_TRIALS = 5


class _StudyOracle:
    """Mixin for a keras-tuner oracle that searches a study.

    Before sampling, it hands out the study's queued trials (the baseline first), and it stops
    creating trials when the study's budget is used or the deadline passed (keras-tuner's own
    ``max_trials`` would count only this project's trials). Which keras-tuner trial runs which
    queued study trial is part of the oracle's saved state, so a resumed search keeps it.
    """

    #: Set by the launcher; not part of the saved state.
    study_mirror: StudyMirror | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: keras-tuner trial id -> storage id of the queued study trial it runs.
        self.queued_claims: dict[str, int] = {}

    def create_trial(self, tuner_id):
        mirror = self.study_mirror
        if mirror is not None and tuner_id not in self.ongoing_trials:
            # keras-tuner takes the trials of its retry queue (interrupted ones) first.
            retry = bool(self._retry_queue)
            if not mirror.may_start_trial(set(self.queued_claims.values()), retry=retry):
                return keras_tuner.engine.trial.Trial(self.get_space(), status=keras_tuner.engine.trial.TrialStatus.STOPPED)
        return super().create_trial(tuner_id)

    def populate_space(self, trial_id):
        mirror = self.study_mirror
        queued = mirror.next_queued(set(self.queued_claims.values())) if mirror is not None else None
        if queued is not None:
            storage_id, values = queued
            self.queued_claims[trial_id] = storage_id
            # No tuner/epochs: Hyperband's run_trial then runs the full schedule, outside its
            # brackets, so the baseline is a complete reference trial.
            return {"status": keras_tuner.engine.trial.TrialStatus.RUNNING, "values": dict(values)}
        return super().populate_space(trial_id)

    def get_state(self):
        state = super().get_state()
        state["autofinetune_queued_claims"] = self.queued_claims
        return state

    def set_state(self, state):
        super().set_state(state)
        self.queued_claims = dict(state.get("autofinetune_queued_claims", {}))


class _HyperbandStudyOracle(_StudyOracle, keras_tuner.oracles.HyperbandOracle):
    pass


class _BayesianStudyOracle(_StudyOracle, keras_tuner.oracles.BayesianOptimizationOracle):
    pass


class _RandomStudyOracle(_StudyOracle, keras_tuner.oracles.RandomSearchOracle):
    pass


def make_oracle(tuner: str, hypermodel: TwoPhaseHyperModel, seed: int):
    """The study-bound oracle of ``--tuner``.

    Args:
        tuner: One of :data:`TUNERS`.
        hypermodel: Gives the objective and Hyperband's ``max_epochs``.
        seed: keras-tuner's seed (the spec's); a resumed project keeps its own random state.
    """
    common = {
        "objective": hypermodel.objective,
        "seed": seed,
        # A trial that raises an unexpected error is not retried: it would fail the same way.
        "max_retries_per_trial": 0,
        "max_consecutive_failed_trials": MAX_CONSECUTIVE_FAILED_TRIALS,
    }
    if tuner == "hyperband":
        # Endless iterations: the study's trial budget ends the search.
        return _HyperbandStudyOracle(
            max_epochs=hypermodel.max_epochs, factor=HYPERBAND_FACTOR, hyperband_iterations=None, **common
        )
    # max_trials=None: the study's budget decides (keras-tuner's would count only this project).
    if tuner == "bayesian":
        return _BayesianStudyOracle(max_trials=None, **common)
    return _RandomStudyOracle(max_trials=None, **common)


_TUNER_CLASSES = {
    "hyperband": keras_tuner.Hyperband,
    "bayesian": keras_tuner.BayesianOptimization,
    "random": keras_tuner.RandomSearch,
}


def mirroring_tuner(
    tuner: str, *, oracle, hypermodel: TwoPhaseHyperModel, mirror: StudyMirror, project: Project, ctrl_c
):
    """A keras-tuner tuner of kind ``tuner`` whose trials are mirrored into the study.

    Args:
        tuner: One of :data:`TUNERS`.
        oracle: The oracle it searches with (one of the ``_StudyOracle`` classes).
        hypermodel: The study's HyperModel.
        mirror: Records its trials in the study database.
        project: Its keras-tuner project.
        ctrl_c: Checked at every trial start and epoch end.
    """
    base: Any = _TUNER_CLASSES[tuner]  # a class chosen at run time

    class MirroringTuner(base):
        """``base`` with an oracle of our making, and a study trial per keras-tuner trial."""

        def __init__(self) -> None:
            # keras_tuner.Tuner's constructor, not base's: base would build its own oracle.
            keras_tuner.Tuner.__init__(
                self, oracle=oracle, hypermodel=hypermodel, directory=str(project.directory),
                project_name=project.name, overwrite=False,
            )

        def on_trial_begin(self, trial) -> None:
            ctrl_c.check()
            super().on_trial_begin(trial)
            mirror.open(trial, self.oracle.queued_claims.get(trial.trial_id))

        def run_trial(self, trial, *args, **kwargs):
            hypermodel.last_result = hypermodel.last_outcome = None
            hypermodel.study_trial = mirror.study_trial_of(trial.trial_id)
            hypermodel.checkpoint_path = (
                Path(self.get_trial_dir(trial.trial_id)) / "model.keras" if mirror.recording.writer.keeps_checkpoints else None
            )
            try:
                return super().run_trial(trial, *args, **kwargs)
            except Exception as error:
                mirror.note_error(trial.trial_id, error)
                raise

        def on_epoch_end(self, trial, model, epoch, logs=None) -> None:
            super().on_epoch_end(trial, model, epoch, logs=logs)
            mirror.report(trial.trial_id, epoch + 1, logs or {})
            ctrl_c.check()

        def on_trial_end(self, trial) -> None:
            try:
                # keras-tuner's verdict first (Hyperband needs it to rank); it may raise when
                # too many trials failed in a row, and the trial is recorded all the same.
                super().on_trial_end(trial)
            finally:
                mirror.close(trial, hypermodel.last_outcome)

    return MirroringTuner()
