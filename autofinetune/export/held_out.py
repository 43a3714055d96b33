"""The held-back test split: how the best trial's model does on images no trial saw.

``data.test_split`` holds a fraction of the images back from every trial (stratified, seeded;
see :func:`autofinetune.data.sources.load_data`). When a launch ends, the best trial's kept
model is scored on them (:func:`score_on_test_split`) and the score stored on the study
(``autofinetune:test_score``): ``status``, the report, the trackers' study run and the model
card show it beside the validation value the search selected on, so a user sees how much the
search overfit its validation split. ``export`` scores the model it writes the same way.
"""

from __future__ import annotations

from typing import Any

from autofinetune.trial.selection import metric_on, probabilities_of


def score_on_test_split(model, data, *, trial: int) -> dict[str, Any]:
    """Accuracy and cross-entropy of ``model`` on ``data``'s held-back images.

    Args:
        model: A Keras model that takes raw 0..255 images and outputs class probabilities.
        data: The :class:`~autofinetune.data.sources.ImageData`, with a test split.
        trial: The number of the trial whose model it is (recorded with the score).

    Returns:
        ``{"trial", "images", "accuracy", "loss"}``.
    """
    probabilities = probabilities_of(model, data.x_test)
    return {
        "trial": trial,
        "images": int(len(data.y_test)),
        "accuracy": metric_on(probabilities, data.y_test, "accuracy"),
        "loss": metric_on(probabilities, data.y_test, "loss"),
    }


def export_test_score(study, trial, spec, model, *, from_checkpoint: bool) -> dict[str, Any] | None:
    """The score of a model ``export`` writes on the study's held-back images.

    Measured now where the study's images are (and are the study's, by fingerprint), else the
    score the launch measured for this trial's kept model; ``None`` without a test split.

    Args:
        study: The study.
        trial: The exported trial.
        spec: The study's spec.
        model: The model being exported.
        from_checkpoint: Whether the model is the trial's kept checkpoint (the one the launch
            scored), not a new training run.
    """
    from autofinetune.data.sources import load_data
    from autofinetune.errors import ConfigError
    from autofinetune.store.attributes import STUDY_FINGERPRINT_ATTR, STUDY_TEST_SCORE_ATTR

    if spec.data.test_split <= 0:
        return None
    try:
        data = load_data(spec)
    except ConfigError:
        data = None  # exported where the images are not
    if data is not None and data.fingerprint == study.user_attrs.get(STUDY_FINGERPRINT_ATTR, data.fingerprint):
        return {**score_on_test_split(model, data, trial=trial.number), "measured": "at export"}
    stored = study.user_attrs.get(STUDY_TEST_SCORE_ATTR)
    if from_checkpoint and stored and stored.get("trial") == trial.number:
        return {**stored, "measured": "when the launch ended"}
    return None
