"""Classify image files with an exported model (see :mod:`autofinetune.export.exporter`).

The export folder's ``model_card.json`` says which format the model is in, the input size and
the class names in label order. A Keras model is loaded with ``safe_mode=True`` (no arbitrary
code from the file); SavedModel, TFLite and ONNX models run through their own runtimes. An image
that cannot be read is reported by name and the others are still classified.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from autofinetune.data.files import IMAGE_EXTENSIONS, find_unreadable, list_image_files, load_image
from autofinetune.errors import ConfigError
from autofinetune.export.exporter import FORMATS, ONNX_EXTRA
from autofinetune.export.model_card import CARD_JSON

#: Images per forward pass: bounds memory for large folders.
BATCH_SIZE = 32


@dataclass(frozen=True)
class ExportedModel:
    """A loaded export.

    Attributes:
        card: The model card.
        classes: Class names in label order.
        image_size: Height and width the model takes.
        predict: Maps a float32 batch ``(n, size, size, 3)`` of raw 0..255 pixels to
            probabilities ``(n, classes)``.
    """

    card: dict
    classes: list[str]
    image_size: int
    predict: Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Prediction:
    """The top classes of one image, most probable first."""

    file: str
    top: list[tuple[str, float]]

    def to_dict(self) -> dict:
        return {"file": self.file, "predictions": [{"label": c, "probability": p} for c, p in self.top]}


@dataclass
class PredictionRun:
    """Predictions of a run, and the inputs that could not be classified (file, reason)."""

    predictions: list[Prediction] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)


def read_model_card(model_dir: str | Path) -> dict:
    """The model card of an export folder.

    Raises:
        ConfigError: the folder is missing or holds no readable ``model_card.json``.
    """
    folder = Path(model_dir)
    path = folder / CARD_JSON
    if not folder.is_dir():
        raise ConfigError(f"MODEL_DIR: {str(folder)!r} is not a folder; give a folder written by `autofinetune export`")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"MODEL_DIR: {str(folder)!r} holds no {CARD_JSON}; give a folder written by `autofinetune export`"
        ) from None
    except (OSError, ValueError) as error:
        raise ConfigError(f"MODEL_DIR: {path} is not readable JSON ({error})") from None
    if card.get("format") not in FORMATS:
        raise ConfigError(f"{path}: format: got {card.get('format')!r}; allowed: {', '.join(FORMATS)}")
    return card


def load_exported_model(model_dir: str | Path) -> ExportedModel:
    """Load an export folder's model for prediction.

    Raises:
        ConfigError: not an export folder, or the runtime its format needs is missing.
    """
    folder = Path(model_dir)
    card = read_model_card(folder)
    path = folder / card.get("model_file", FORMATS[card["format"]])
    if not path.exists():
        raise ConfigError(f"MODEL_DIR: {str(path)!r} is missing; the export is incomplete, export it again")
    loader = {"keras": _keras_predictor, "savedmodel": _savedmodel_predictor, "tflite": _tflite_predictor,
              "onnx": _onnx_predictor}[card["format"]]
    return ExportedModel(
        card=card, classes=list(card["classes"]), image_size=int(card["input"]["height"]), predict=loader(path)
    )


def _keras_predictor(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    import keras

    import autofinetune.trial.model  # noqa: F401  (registers ResNetPreprocess, named by exports of older checkpoints)

    model = keras.saving.load_model(path, compile=False, safe_mode=True)
    return lambda x: np.asarray(model.predict(x, batch_size=BATCH_SIZE, verbose=0))


def _savedmodel_predictor(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    import keras

    if keras.backend.backend() != "tensorflow":
        raise ConfigError(f"a SavedModel needs Keras's TensorFlow backend, but got {keras.backend.backend()!r}")
    layer = keras.layers.TFSMLayer(str(path), call_endpoint="serve")

    def predict(x: np.ndarray) -> np.ndarray:
        out = layer(x)
        if isinstance(out, dict):  # a signature with named outputs; ours has one
            out = next(iter(out.values()))
        return np.asarray(out)

    return predict


def _tflite_predictor(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    try:  # LiteRT's own package, where installed; TensorFlow's interpreter otherwise
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    interpreter = Interpreter(model_path=str(path))

    def predict(x: np.ndarray) -> np.ndarray:
        source = interpreter.get_input_details()[0]
        interpreter.resize_tensor_input(source["index"], list(x.shape))
        interpreter.allocate_tensors()
        source = interpreter.get_input_details()[0]
        interpreter.set_tensor(source["index"], x.astype(source["dtype"]))
        interpreter.invoke()
        return np.asarray(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]))

    return predict


def _onnx_predictor(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(f"an ONNX model needs onnxruntime; install the onnx extra: {ONNX_EXTRA}") from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: np.asarray(session.run(None, {name: x.astype(np.float32)})[0])


def collect_images(inputs: Sequence[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """The image files named or found (recursively, by extension) in folders, in order.

    Returns:
        ``(files, errors)``: errors name a missing path or a folder without images.
    """
    files: list[Path] = []
    errors: list[tuple[str, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = list_image_files(path)  # as for training: hidden and system files are skipped
            if not found:
                errors.append((str(path), f"no image files in this folder (extensions: {', '.join(IMAGE_EXTENSIONS)})"))
            files.extend(found)
        elif path.is_file():
            files.append(path)  # named explicitly: tried whatever its extension
        else:
            errors.append((str(path), "no such file or folder"))
    return files, errors


def predict_images(
    model: ExportedModel,
    inputs: Sequence[str | Path],
    *,
    top_k: int = 3,
    on_error: Callable[[str, str], None] | None = None,
) -> PredictionRun:
    """Classify images; unreadable ones are reported and skipped.

    Args:
        model: A loaded export.
        inputs: Image files and folders.
        top_k: How many classes to give per image (at most the number of classes).
        on_error: Called with (file, reason) for each input that cannot be classified, as found.
    """
    run = PredictionRun()

    def fail(name: str, reason: str) -> None:
        run.errors.append((name, reason))
        if on_error is not None:
            on_error(name, reason)

    files, errors = collect_images(inputs)
    for name, reason in errors:
        fail(name, reason)
    # One pass over every file first, as `launch` does for a training folder: all the bad files
    # are named before any prediction, and the rest are classified.
    unreadable = {item.path: item.reason for item in find_unreadable(files)}
    for path in files:
        if path in unreadable:
            fail(str(path), unreadable[path])
    files = [path for path in files if path not in unreadable]
    k = max(1, min(top_k, len(model.classes)))
    for start in range(0, len(files), BATCH_SIZE):
        batch_files, images = [], []
        for path in files[start : start + BATCH_SIZE]:
            try:
                images.append(load_image(path, model.image_size))
                batch_files.append(path)
            except ValueError as error:
                fail(str(path), str(error).removeprefix(f"{path}: "))
        if not images:
            continue
        probabilities = model.predict(np.stack(images).astype(np.float32))
        for path, row in zip(batch_files, probabilities):
            order = np.argsort(-row, kind="stable")[:k]
            run.predictions.append(Prediction(str(path), [(model.classes[i], float(row[i])) for i in order]))
    return run


def format_prediction(prediction: Prediction) -> str:
    """One line: the file, then label (probability) pairs."""
    return f"{prediction.file}: " + ", ".join(f"{label} ({p:.3f})" for label, p in prediction.top)
