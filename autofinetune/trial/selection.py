"""The final choice's score: a finished trial's best-epoch model on the selection split.

The validation split picks each trial's best epoch, ranks the trials for the pruner and the
sampler, and names the best trial; over many trials its maximum is an optimistic estimate,
more so the more trials a search runs and the fewer validation images it has. With
``data.selection_split`` a finished trial's best-epoch model (its checkpoint) is also scored
on images no trial trained or validated on, on the objective's metric, and the study's best
trial is the one of its best few by validation that scores best there
(:func:`autofinetune.store.study.best_feasible_trial`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from autofinetune.spec.objectives import SELECTION_SCORE_ATTR, TOP_K

if TYPE_CHECKING:
    from autofinetune.data.sources import ImageData
    from autofinetune.spec import ObjectiveSpec

#: Images per forward pass when scoring (inference only).
SCORE_BATCH_SIZE = 64


def probabilities_of(model: Any, images: np.ndarray) -> np.ndarray:
    """``model``'s class probabilities of raw ``images``, called eagerly, batch by batch.

    As the constraints' measures are: no predict function is traced for one pass over a few
    images, in a process that may go on training.
    """
    images = images.astype("float32")
    return np.concatenate([
        np.asarray(model(images[start:start + SCORE_BATCH_SIZE], training=False))
        for start in range(0, len(images), SCORE_BATCH_SIZE)
    ])


def metric_on(probabilities: np.ndarray, labels: np.ndarray, metric: str) -> float:
    """An epoch metric's value on predicted class probabilities.

    Args:
        probabilities: ``(images, classes)`` class probabilities.
        labels: The true class of each image.
        metric: An epoch metric of :data:`~autofinetune.spec.objectives.EPOCH_METRICS`; a ``val_``
            one is read as the same metric on these images. The loss is the plain cross-entropy
            (no label smoothing, which differs between trials).
    """
    name = metric.removeprefix("val_")
    labels = labels.astype(int)
    if name == "accuracy":
        return float(np.mean(np.argmax(probabilities, axis=1) == labels))
    if name == "loss":
        picked = np.clip(probabilities[np.arange(len(labels)), labels], 1e-7, 1.0)
        return float(-np.mean(np.log(picked)))
    if name == f"top_{TOP_K}_accuracy":
        top = np.argsort(-probabilities, axis=1)[:, :TOP_K]
        return float(np.mean(np.any(top == labels[:, None], axis=1)))
    if name == "f1":
        from sklearn.metrics import f1_score

        predicted = np.argmax(probabilities, axis=1)
        classes = list(range(probabilities.shape[1]))
        return float(f1_score(labels, predicted, labels=classes, average="macro", zero_division=0))
    raise ValueError(f"objective.metric: no score on the selection split for {metric!r}")


def selection_record(model: Any, data: "ImageData", objective: "ObjectiveSpec") -> dict[str, Any]:
    """``{SELECTION_SCORE_ATTR: {"metric", "value", "images", "among"}}`` of ``model`` on the
    selection split (empty when the data holds none back).

    Args:
        model: The trial's classifier with its best epoch's weights (raw 0..255 images in).
        data: The study's images.
        objective: The spec's objective: its metric is scored, and ``final_choice_among`` says
            how many of the best trials compete on it.
    """
    if not data.has_selection_split:
        return {}
    value = metric_on(probabilities_of(model, data.x_select), data.y_select, objective.metric)
    return {
        SELECTION_SCORE_ATTR: {
            "metric": objective.metric,
            "value": value,
            "images": int(len(data.y_select)),
            "among": objective.final_choice_among,
        }
    }
