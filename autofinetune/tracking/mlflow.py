"""MLflow: one run per trial, nested under one run of the study, found by the study's id.

Layout in the tracking server: an experiment named after the study; in it one parent run per
study (tags ``autofinetune.role = study`` and ``autofinetune.study_uid``, the id stored on the
study when it was created), shared by every worker and every resumed launch, and one child run
per trial (``mlflow.parentRunId``, tags ``autofinetune.trial_number`` and the study's id) with the
trial's params, ``phase_boundary_step``, every epoch's metrics on the global step, tags
``autofinetune.state`` and ``autofinetune.fail_reason``, and the kept checkpoint as an artifact
under ``checkpoint/``. Two studies of one name (in two study databases) never share a run.

The parent run holds the spec (flattened), the engine, sampler and pruner as params; it is
RUNNING while a launch runs (reopened on resume) and ends FINISHED, FAILED or KILLED with it. At
the study's end the best trial's run gets ``autofinetune.best = true``; the parent run gets
``autofinetune.best_trial``, the held-back test split's ``test_accuracy`` and ``test_loss`` when
the spec holds images back, and the best trial's model as an MLflow model (``best_model``,
served by ``mlflow.pyfunc.load_model``; registered under ``tracking.mlflow_register``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Mapping

from autofinetune.errors import ConfigError
from autofinetune.tracking.base import StudyEnd, StudyInfo, Tracker, TrialInfo, check_reachable, redact

ROLE_TAG = "autofinetune.role"
STUDY_TAG = "autofinetune.study"
UID_TAG = "autofinetune.study_uid"
TRIAL_TAG = "autofinetune.trial_number"
STATE_TAG = "autofinetune.state"
REASON_TAG = "autofinetune.fail_reason"
BEST_TAG = "autofinetune.best"
#: MLflow's tag values hold at most 8000 characters.
MAX_TAG_CHARS = 5000
#: Optuna's trial states -> MLflow's run statuses.
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
#: MLflow takes at most 100 params per batch, each value at most 6000 characters.
PARAMS_PER_BATCH = 100
MAX_PARAM_CHARS = 6000


class MlflowTracker(Tracker):
    """Logs a study's trials to an MLflow tracking URI.

    Args:
        uri: The tracking URI (a server, ``file:///folder``, a database URL, or a folder).
        study: The study's name (the experiment's and the parent run's name).
        study_uid: The study's stable id, by which its runs are found.
        register_as: Register the best trial's model under this name in MLflow's model registry.
    """

    name = "mlflow"
    extra = "mlflow"

    def __init__(self, uri: str, *, study: str, study_uid: str = "", register_as: str | None = None) -> None:
        self.uri = uri
        self.study = study
        self.study_uid = study_uid
        self.register_as = register_as
        self._client_obj = None
        self._experiment_id: str | None = None
        self._parent_id: str | None = None
        #: Trial number -> its run id (runs opened by this process).
        self._runs: dict[int, str] = {}

    # -- connection ---------------------------------------------------------------------

    @property
    def _client(self):
        if self._client_obj is None:
            tracking = self.import_package("mlflow.tracking")
            self._client_obj = tracking.MlflowClient(tracking_uri=self.uri)
        return self._client_obj

    def check(self) -> None:
        self.import_package("mlflow")
        if self.uri.startswith(("http://", "https://")):
            # MLflow's own client retries a closed port for minutes; one connection says it now.
            check_reachable(self.uri, where=self.where)
        try:
            self._experiment()
        except ConfigError:
            raise
        except Exception as error:
            # MLflow's message says what to do (its file store's switch, a database URI): whole.
            raise ConfigError(
                f"{self.where}: cannot use MLflow at {redact(self.uri)}: {type(error).__name__}: {str(error).strip()}"
            ) from None

    def _experiment(self) -> str:
        if self._experiment_id is None:
            client = self._client
            found = client.get_experiment_by_name(self.study)
            if found is None:
                try:
                    self._experiment_id = client.create_experiment(self.study, tags={STUDY_TAG: self.study})
                except Exception:  # another worker created it first
                    found = client.get_experiment_by_name(self.study)
                    if found is None:
                        raise
            if found is not None:
                self._experiment_id = found.experiment_id
        return str(self._experiment_id)

    def _of_this_study(self, role: str) -> str:
        """The filter of this study's runs of a role (``study`` or ``trial``)."""
        found = f"tags.`{ROLE_TAG}` = '{role}'"
        return f"{found} and tags.`{UID_TAG}` = '{self.study_uid}'" if self.study_uid else found

    def _parent_run(self) -> str:
        """The study's run: the oldest one tagged with the study's id, created when there is none."""
        if self._parent_id is None:
            experiment = self._experiment()
            runs = self._client.search_runs(
                [experiment], filter_string=self._of_this_study("study"),
                order_by=["attributes.start_time ASC"], max_results=1,
            )
            if runs:
                self._parent_id = runs[0].info.run_id
            else:
                run = self._client.create_run(
                    experiment, run_name=self.study,
                    tags={ROLE_TAG: "study", STUDY_TAG: self.study, UID_TAG: self.study_uid},
                )
                self._parent_id = run.info.run_id
        return self._parent_id

    def _trial_run(self, number: int) -> str | None:
        """The run of trial ``number`` (this process's, else one another process opened)."""
        if number not in self._runs:
            runs = self._client.search_runs(
                [self._experiment()],
                filter_string=f"{self._of_this_study('trial')} and tags.`{TRIAL_TAG}` = '{number}'",
                max_results=1,
            )
            if runs:
                self._runs[number] = runs[0].info.run_id
        return self._runs.get(number)

    # -- the contract -------------------------------------------------------------------

    def start_study(self, study: StudyInfo) -> None:
        """The parent run RUNNING (reopened when a resumed launch finds it ended), with the
        spec, engine, sampler and pruner as params."""
        parent = self._parent_run()
        run = self._client.get_run(parent)
        if run.info.status != "RUNNING":
            self._client.update_run(parent, status="RUNNING")
        params = {**study.spec, "engine": study.engine, "sampler": study.spec.get("search.sampler"),
                  "pruner": study.spec.get("search.pruner")}
        # MLflow's params cannot change: a resumed study keeps the values it began with (those
        # a resume may change, such as search.n_trials, are the study database's to tell).
        self._log_params(parent, {key: value for key, value in params.items() if key not in run.data.params})

    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(key, str(value)[:MAX_PARAM_CHARS]) for key, value in params.items()]
        for start in range(0, len(items), PARAMS_PER_BATCH):
            self._client.log_batch(run_id, params=items[start : start + PARAMS_PER_BATCH])

    def start_trial(self, trial: TrialInfo) -> None:
        if self._trial_run(trial.number) is not None:
            return  # a retry of the same trial in another process (a Ray actor, then the driver)
        parent = self._parent_run()
        run = self._client.create_run(
            self._experiment(),
            run_name=f"trial_{trial.number}",
            tags={
                "mlflow.parentRunId": parent, ROLE_TAG: "trial", STUDY_TAG: trial.study, UID_TAG: self.study_uid,
                TRIAL_TAG: str(trial.number), STATE_TAG: "RUNNING",
            },
        )
        self._runs[trial.number] = run.info.run_id
        self._log_params(run.info.run_id, {**trial.params, "phase_boundary_step": trial.phase_boundary_step})

    def log_epoch(self, number: int, step: int, metrics: Mapping[str, float], *, phase: int) -> None:
        from mlflow.entities import Metric

        run_id = self._trial_run(number)
        if run_id is None:
            return
        now = int(time.time() * 1000)
        values = {**metrics, "phase": float(phase)}
        batch = [Metric(key, float(value), now, step) for key, value in values.items() if _finite(value)]
        self._client.log_batch(run_id, metrics=batch)

    def end_trial(
        self, number: int, *, state: str, value: float | None, reason: str | None, checkpoint: str | None
    ) -> None:
        run_id = self._trial_run(number)
        if run_id is None:
            return
        self._client.set_tag(run_id, STATE_TAG, state)
        if reason:
            self._client.set_tag(run_id, REASON_TAG, reason[:MAX_TAG_CHARS])
        if value is not None and _finite(value):
            self._client.log_metric(run_id, "objective_value", float(value))
        if checkpoint is not None and Path(checkpoint).is_file():
            self._client.log_artifact(run_id, str(checkpoint), artifact_path="checkpoint")
        self._client.set_terminated(run_id, status=RUN_STATUS.get(state, "FINISHED"))
        self._runs.pop(number, None)

    def end_study(self, end: StudyEnd) -> None:
        """Mark the best trial's run, and end the parent run with the launch's status."""
        parent = self._parent_run()
        if end.best_number is not None:
            for run in self._client.search_runs(
                [self._experiment()], filter_string=f"{self._of_this_study('trial')} and tags.`{BEST_TAG}` = 'true'",
                max_results=100,
            ):
                self._client.set_tag(run.info.run_id, BEST_TAG, "false")
            best_run = self._trial_run(end.best_number)
            if best_run is not None:
                self._client.set_tag(best_run, BEST_TAG, "true")
            self._client.set_tag(parent, "autofinetune.best_trial", str(end.best_number))
        if end.best_value is not None and _finite(end.best_value):
            self._client.log_metric(parent, "best_value", float(end.best_value))
        if end.test_score:
            for metric in ("accuracy", "loss"):
                if _finite(end.test_score.get(metric)):
                    self._client.log_metric(parent, f"test_{metric}", float(end.test_score[metric]))
            self._client.set_tag(parent, "autofinetune.test_trial", str(end.test_score.get("trial")))
        if end.best_model is not None:
            self._log_model(parent, end.best_model)
        # Last: logging the model goes through a run context, which ends the run as it likes.
        self._client.set_terminated(parent, status=end.status)

    def _log_model(self, parent: str, model: Any) -> None:
        """The best trial's model on the study's run, as an MLflow model that
        ``mlflow.pyfunc.load_model`` serves (raw images in, probabilities out); registered under
        :attr:`register_as` when given."""
        import mlflow
        import numpy as np
        from mlflow.models import infer_signature

        sample = np.zeros((1, *model.input_shape[1:]), dtype="float32")
        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(self.uri)
        try:
            with mlflow.start_run(run_id=parent):
                info = mlflow.keras.log_model(
                    model, name=BEST_MODEL_NAME, registered_model_name=self.register_as,
                    signature=infer_signature(sample, np.asarray(model.predict(sample, verbose=0))),
                    # Named here: inferring them would load the model again in a subprocess.
                    pip_requirements=_model_requirements(),
                )
        finally:
            mlflow.set_tracking_uri(previous)
        self._client.set_tag(parent, "autofinetune.best_model_uri", info.model_uri)


#: The name of the best trial's model among the study run's models.
BEST_MODEL_NAME = "best_model"


def _model_requirements() -> list[str]:
    """What serving the model needs: Keras and its backend, at the versions that saved it."""
    import importlib.metadata
    import os

    backend = {"jax": "jax", "torch": "torch"}.get(os.environ.get("KERAS_BACKEND", "tensorflow"), "tensorflow")
    found = []
    for package in ("keras", backend):
        try:
            found.append(f"{package}=={importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(package)
    return found


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
