"""Export a trial's model: raw pixels in, class probabilities out, with a model card.

The model comes from the trial's kept checkpoint (an artifact) or, when that was not kept, from
training the trial's params again. It already holds its preprocessing (a built-in Keras
layer), so every format takes raw 0..255 RGB pixels and a ``.keras`` file loads with plain Keras.
Everything that can be checked cheaply (format, trial, checkpoint, output folder) is checked
before Keras is imported, and the export is written to a staging folder that replaces the output folder only once complete.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from autofinetune.data.files import readable_by_others
from autofinetune.errors import ConfigError, FatalError
from autofinetune.export.model_card import CARD_JSON, CARD_MARKDOWN, build_model_card, model_card_markdown
from autofinetune.store.study import best_feasible_trial

#: Export format -> the file (or folder) the model is written to.
FORMATS: dict[str, str] = {
    "keras": "model.keras",
    "savedmodel": "saved_model",
    "tflite": "model.tflite",
    "onnx": "model.onnx",
}
ONNX_EXTRA = "pip install 'autofinetune[onnx]'"


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote.

    Attributes:
        out_dir: The export folder.
        model_path: The model file (or SavedModel folder) inside it.
        card: The model card's data (also in ``model_card.json``).
    """

    out_dir: Path
    model_path: Path
    card: dict[str, Any]


# --- cheap checks, before anything heavy ---------------------------------------------------


def check_format(fmt_name: str) -> None:
    """Refuse an unknown format, or ONNX without its converter.

    Raises:
        ConfigError: the format is unknown, or ``onnx`` without ``tf2onnx``/``onnx`` installed.
    """
    if fmt_name not in FORMATS:
        raise ConfigError(f"--format: got {fmt_name!r}; allowed: {', '.join(FORMATS)}")
    if fmt_name == "onnx":
        missing = [name for name in ("tf2onnx", "onnx") if importlib.util.find_spec(name) is None]
        if missing:
            raise ConfigError(
                f"--format onnx: {' and '.join(missing)} not installed; install the onnx extra: {ONNX_EXTRA}"
            )


def choose_trial(study, number: int | None, *, retrain: bool = False):
    """The trial to export: ``number``, or the study's best.

    Args:
        study: The study.
        number: A trial number; ``None`` picks the best complete trial.
        retrain: Whether the params will be trained again (then a pruned or failed trial's
            params may be exported too).

    Raises:
        ConfigError: no complete trial, an unknown number, or an unfinished trial.
    """
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    if number is None:
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if not complete:
            states = ", ".join(f"{t.number}: {t.state.name}" for t in trials) or "none"
            raise ConfigError(
                f"study {study.study_name!r} has no completed trial to export (trials: {states}); "
                "run more trials, or name one with --trial N --retrain"
            )
        best = best_feasible_trial(study)
        if best is None:
            raise ConfigError(
                f"study {study.study_name!r} has no completed trial that keeps objective.constraints; "
                "name one with --trial N to export it anyway"
            )
        return best
    by_number = {t.number: t for t in trials}
    if number not in by_number:
        known = f"0..{max(by_number)}" if by_number else "none"
        raise ConfigError(f"--trial: got {number}; study {study.study_name!r} has trials {known}")
    trial = by_number[number]
    if trial.state != TrialState.COMPLETE and not (retrain and trial.state.is_finished()):
        raise ConfigError(
            f"--trial: trial {number} is {trial.state.name}; allowed: a COMPLETE trial"
            + ("" if not trial.state.is_finished() else ", or pass --retrain to train its params for the full schedule")
        )
    return trial


def check_out_dir(out_dir: Path, *, overwrite: bool) -> None:
    """Refuse an output folder that holds something, unless it is an earlier export and ``overwrite``.

    Raises:
        ConfigError: ``out_dir`` is a file, is not empty (without ``overwrite``), or is not
            an earlier export (with ``overwrite``: we never delete what we did not write).
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out: {str(out_dir)!r} is a file; give a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise ConfigError(f"--out: {str(out_dir)!r} is not empty; pass --overwrite to replace an earlier export")
        if not (out_dir / CARD_JSON).is_file():
            raise ConfigError(
                f"--out: {str(out_dir)!r} is not empty and holds no {CARD_JSON}, so it is not an earlier "
                "export; --overwrite replaces only those. Choose a new or empty folder"
            )


def _make_staging(out_dir: Path) -> Path:
    """A fresh folder beside ``out_dir`` (same file system, so the final rename is atomic)."""
    parent = out_dir.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=parent))
        readable_by_others(staging)  # it becomes the export, meant to be shared
        return staging
    except OSError as error:
        raise ConfigError(
            f"--out: cannot write to {str(out_dir)!r} ({error.strerror or error}); choose a writable folder"
        ) from None


def _finish(staging: Path, out_dir: Path) -> None:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(staging, out_dir)


# --- getting the model -----------------------------------------------------------------------


def fetch_checkpoint(trial, artifact_store, destination: Path) -> str:
    """Download the trial's kept checkpoint; returns its artifact id.

    Raises:
        ConfigError: the trial kept no checkpoint, or it was removed since; the message points
            to ``--retrain``.
    """
    from optuna.artifacts import download_artifact

    from autofinetune.store.attributes import CHECKPOINT_ATTR

    artifact_id = trial.user_attrs.get(CHECKPOINT_ATTR)
    hint = "pass --retrain to train its params again"
    if not artifact_id:
        raise ConfigError(
            f"trial {trial.number} kept no checkpoint (only the best search.keep_checkpoints trials keep one); {hint}"
        )
    if artifact_store is None:
        raise ConfigError(f"trial {trial.number}: no artifact store to read its checkpoint from; {hint}")
    try:
        download_artifact(artifact_store=artifact_store, file_path=str(destination), artifact_id=artifact_id)
    except Exception as error:  # ArtifactNotFound, or a missing file/bucket key
        raise ConfigError(
            f"trial {trial.number}: its checkpoint (artifact {artifact_id}) cannot be read "
            f"({type(error).__name__}); it was removed when better trials came, or the artifact "
            f"store moved (--artifacts); {hint}"
        ) from None
    return artifact_id


def load_kept_model(trial, artifact_store):
    """The trial's kept checkpoint, loaded as a Keras model (raw images in, probabilities out).

    Raises:
        ConfigError: the trial kept no checkpoint, or it cannot be read.
    """
    import keras

    import autofinetune.trial.model  # noqa: F401  (registers ResNetPreprocess: older checkpoints name it)

    with tempfile.TemporaryDirectory(prefix="autofinetune-best-") as folder:
        path = Path(folder) / "checkpoint.keras"
        fetch_checkpoint(trial, artifact_store, path)
        return keras.saving.load_model(path, compile=False, safe_mode=True)


def _check_checkpoint_readable(trial, artifact_store) -> None:
    """Raise :func:`fetch_checkpoint`'s error now if the checkpoint cannot be read."""
    from autofinetune.store.attributes import CHECKPOINT_ATTR

    artifact_id = trial.user_attrs.get(CHECKPOINT_ATTR)
    if artifact_id and artifact_store is not None:
        try:
            artifact_store.open_reader(artifact_id).close()
            return
        except Exception:
            pass
    with tempfile.TemporaryDirectory() as folder:
        fetch_checkpoint(trial, artifact_store, Path(folder) / "checkpoint.keras")


def retrain_trial(study, trial, destination: Path, *, train_on_all: bool, log: Callable[[str], None]):
    """Train the trial's params again and save the best epoch's model to ``destination``.

    With ``train_on_all`` the validation images (and ``data.selection_split``'s) join the
    training images, and the schedule stops at the trial's best step (its validation metrics
    are then no held-out estimate).

    Returns:
        The :class:`~autofinetune.trial.results.TrialResult` of the new run.

    Raises:
        ConfigError: the study's data changed since it ran (by fingerprint).
        FatalError: the new run failed.
    """
    from autofinetune.data.sources import load_data
    from autofinetune.trial.devices import prepare_devices
    from autofinetune.trial.schedule import run_trial
    from autofinetune.search.space import complete_params
    from autofinetune.store.attributes import STUDY_FINGERPRINT_ATTR
    from autofinetune.store.study import spec_from_study

    spec = spec_from_study(study)
    data = load_data(spec)
    known = study.user_attrs.get(STUDY_FINGERPRINT_ATTR)
    if known and known != data.fingerprint:
        raise ConfigError(
            f"data: {data.source} differs from the data study {study.study_name!r} ran on (fingerprint "
            f"{data.fingerprint[:12]} != {known[:12]}); retraining would not reproduce trial {trial.number}"
        )
    params = complete_params(spec, trial.params)
    if train_on_all:
        best_step = trial.user_attrs.get("best_step") or spec.schedule.total_epochs
        e1 = spec.schedule.phase1_epochs
        schedule = spec.schedule.model_copy(
            update={"phase1_epochs": min(best_step, e1), "phase2_epochs": max(0, best_step - e1)}
        )
        spec = spec.model_copy(update={"schedule": schedule})
        # The selection split's images, the final choice made, join the training images.
        data = data.training_on_all_but_test()
    log(
        f"retraining trial {trial.number} ({spec.schedule.total_epochs} epochs"
        + (", on training and validation images" if train_on_all else "")
        + ")"
    )
    prepare_devices()
    result = run_trial(spec, params, data, checkpoint_path=destination)
    if result.state != "complete" or result.checkpoint_path is None:
        raise FatalError(f"retraining trial {trial.number} ended {result.state}: {result.error or 'no epoch finished'}")
    return result


def write_model(model, staging: Path, fmt_name: str) -> Path:
    """Write ``model`` in one format into ``staging``; returns the written path.

    Raises:
        ConfigError: a TensorFlow-only format under another Keras backend.
    """
    import keras
    import numpy as np

    path = staging / FORMATS[fmt_name]
    if fmt_name == "keras":
        model.save(path)
        return path
    if keras.backend.backend() != "tensorflow" and fmt_name in ("savedmodel", "tflite"):
        raise ConfigError(
            f"--format {fmt_name}: needs the TensorFlow backend of Keras, but got {keras.backend.backend()!r}; "
            "unset KERAS_BACKEND (or export --format keras and convert elsewhere)"
        )
    keras_format = {"savedmodel": "tf_saved_model", "tflite": "litert", "onnx": "onnx"}[fmt_name]
    # Keras infers the exported signature from a model that has been called; a model loaded from
    # a file has not, so one image of zeros goes through it first.
    model(np.zeros((1, *model.input_shape[1:]), dtype="float32"))
    with warnings.catch_warnings():
        # Keras's ONNX exporter probes NumPy for np.object, which NumPy 2 warns about.
        warnings.filterwarnings("ignore", message="In the future `np.object`", category=FutureWarning)
        model.export(str(path), format=keras_format, verbose=False)
    return path


# --- the export ------------------------------------------------------------------------------


def export_trial(
    study,
    *,
    out_dir: str | Path,
    storage_url: str,
    trial_number: int | None = None,
    fmt_name: str = "keras",
    retrain: bool = False,
    train_on_all: bool = False,
    overwrite: bool = False,
    artifact_store=None,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Export a trial's model with its model card.

    Args:
        study: The study.
        out_dir: The folder to write (must be new or empty, or an earlier export with ``overwrite``).
        storage_url: The study database's URL (recorded, redacted, in the card).
        trial_number: The trial; ``None`` exports the best one.
        fmt_name: ``keras``, ``savedmodel``, ``tflite`` or ``onnx``.
        retrain: Train the trial's params again when its checkpoint was not kept.
        train_on_all: With ``retrain``, train on training and validation images.
        overwrite: Replace an earlier export in ``out_dir``.
        artifact_store: The study's artifact store (where kept checkpoints are).
        log: Prints progress lines.

    Raises:
        ConfigError: a bad format or trial, no checkpoint without ``retrain``, or an output
            folder that cannot or must not be written. Nothing is written then.
    """
    out_dir = Path(out_dir)
    check_format(fmt_name)
    if train_on_all and not retrain:
        raise ConfigError("--train-on-all: only together with --retrain (a kept checkpoint saw no validation images)")
    trial = choose_trial(study, trial_number, retrain=retrain)
    check_out_dir(out_dir, overwrite=overwrite)
    if not train_on_all and not retrain:
        # Fails here, before anything is written, when the checkpoint is gone.
        _check_checkpoint_readable(trial, artifact_store)
    staging = _make_staging(out_dir)
    try:
        checkpoint = staging / ".checkpoint.keras"
        weights_source = _trial_checkpoint(
            study, trial, checkpoint, retrain=retrain, train_on_all=train_on_all, artifact_store=artifact_store, log=log
        )

        import keras

        import autofinetune.trial.model  # noqa: F401  (registers ResNetPreprocess: older checkpoints name it)
        from autofinetune.export.held_out import export_test_score
        from autofinetune.store.study import spec_from_study

        model = keras.saving.load_model(checkpoint, compile=False, safe_mode=True)
        checkpoint.unlink()
        spec = spec_from_study(study)
        class_names = _class_names(study, spec, int(model.output_shape[-1]))
        test_score = export_test_score(study, trial, spec, model, from_checkpoint=weights_source["kind"] == "checkpoint")
        model_path = write_model(model, staging, fmt_name)
        card = build_model_card(
            study, trial, fmt_name=fmt_name, model_file=model_path.name, class_names=class_names, image_size=int(model.input_shape[1]),
            weights_source=weights_source, storage_url=storage_url, test_score=test_score,
        )
        (staging / CARD_JSON).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
        (staging / CARD_MARKDOWN).write_text(model_card_markdown(card), encoding="utf-8")
        _finish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(out_dir=out_dir, model_path=out_dir / model_path.name, card=card)


def _trial_checkpoint(
    study, trial, destination: Path, *, retrain: bool, train_on_all: bool, artifact_store, log: Callable[[str], None]
) -> dict[str, Any]:
    """Put the trial's model at ``destination``: its kept checkpoint, else (with ``retrain``)
    its params trained again. Returns where the weights came from, for the model card."""
    if not train_on_all:
        try:
            artifact_id = fetch_checkpoint(trial, artifact_store, destination)
            return {"kind": "checkpoint", "artifact_id": artifact_id}
        except ConfigError:
            if not retrain:
                raise
            log(f"trial {trial.number}: its checkpoint was not kept; training its params again")
    result = retrain_trial(study, trial, destination, train_on_all=train_on_all, log=log)
    return {"kind": "retrained", "train_on_all": train_on_all, "value": result.best_value, "best_step": result.best_step}


def _class_names(study, spec, num_outputs: int) -> list[str]:
    """Class names in label order: stored on the study by its first worker, else from the data.

    Raises:
        ConfigError: they cannot be had, or their number differs from the model's outputs.
    """
    from autofinetune.store.attributes import STUDY_CLASSES_ATTR

    names = study.user_attrs.get(STUDY_CLASSES_ATTR)
    if not names:
        from autofinetune.data.sources import load_data, scan_image_folder

        # Listing a folder's classes needs no decoding; the builtin sources are small.
        folder = spec.image_folder
        names = [name for name, _ in scan_image_folder(folder)] if folder is not None else list(load_data(spec).class_names)
    if len(names) != num_outputs:
        raise ConfigError(
            f"data: the model has {num_outputs} outputs but the data has {len(names)} classes "
            f"({', '.join(names[:10])}); the data changed since the study ran"
        )
    return list(names)
