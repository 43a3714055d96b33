"""The names of what autofinetune stores on a study and its trials, the same for every engine."""

from __future__ import annotations

# Declared beside the constraints they describe; named here with the rest.
from autofinetune.spec.constraints import CONSTRAINT_MEASURES_ATTR as CONSTRAINT_MEASURES_ATTR
from autofinetune.spec.constraints import CONSTRAINT_VIOLATIONS_ATTR as CONSTRAINT_VIOLATIONS_ATTR
from autofinetune.spec.objectives import SELECTION_SCORE_ATTR as SELECTION_SCORE_ATTR

# Study attributes.
STUDY_SPEC_ATTR = "autofinetune:spec"
STUDY_N_TRIALS_ATTR = "autofinetune:n_trials"
STUDY_FINGERPRINT_ATTR = "autofinetune:data_fingerprint"
STUDY_UNREADABLE_ATTR = "autofinetune:unreadable_files"  # left out by data.skip_unreadable
STUDY_CLASSES_ATTR = "autofinetune:class_names"  # label i is class_names[i]; export needs them
#: A study's stable id, made when it is created: trackers find the study's runs by it, so two
#: studies of one name (in two study databases) never share a run.
STUDY_UID_ATTR = "autofinetune:study_uid"
#: The best trial's score on the images held back from every trial (``data.test_split``),
#: measured when a launch ends: ``{"trial", "images", "accuracy", "loss"}``.
STUDY_TEST_SCORE_ATTR = "autofinetune:test_score"

# Trial attributes every engine writes (user attributes, so the dashboard shows them); the
# constraint measures and violations (CONSTRAINT_MEASURES_ATTR, CONSTRAINT_VIOLATIONS_ATTR) and
# the score on the selection split (SELECTION_SCORE_ATTR) too.
FAIL_REASON_ATTR = "fail_reason"
BASELINE_ATTR = "baseline"
CHECKPOINT_ATTR = "checkpoint_artifact_id"
#: What could not be recorded after a trial's outcome (a checkpoint on a full disk, a tracker
#: that went away): warnings, never a failed trial.
RECORD_WARNINGS_ATTR = "record_warnings"
#: System attributes of a retry, as Optuna's retry callbacks name them (its
#: ``RetryFailedTrialCallback.retried_trial_number`` / ``retry_history`` read them): the number
#: of the failed trial it replaces, and every trial of its retry series before it.
RETRY_OF_ATTR = "failed_trial"
RETRY_HISTORY_ATTR = "retry_history"
#: Trial system attribute: how the trial ended (``state``, ``value``, ``reason``, ``kind``),
#: written before anything else it records, so that a worker dying after it loses no result.
OUTCOME_ATTR = "autofinetune:outcome"
#: Trial user attribute of a configuration queued from a warm-start study: ``"study#number"``.
WARM_START_ATTR = "warm_start_from"
#: Trial system attribute: a token written in the transaction that creates the trial, by which
#: a creation retried after its answer was lost finds the trial it made instead of making another.
CREATION_TOKEN_ATTR = "autofinetune:creation_token"
