"""Images in, arrays out: image folders, the builtin ``digits`` demo and synthetic images.

Every source ends as an :class:`ImageData`: uint8 RGB arrays (raw 0..255 pixels, the model
preprocesses them itself), integer labels, class names in order, and a fingerprint of exactly
those arrays. The train/validation split is stratified and seeded, so every trial and every
worker of a study sees the same split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from autofinetune.errors import ConfigError
from autofinetune.data.files import (
    IMAGE_EXTENSIONS,
    UnreadableImage,
    describe_unreadable,
    find_unreadable,
    list_image_files,
    load_image,
)
from autofinetune.data.image_cache import cache_file, decode_workers, load_images

__all__ = ["IMAGE_EXTENSIONS", "ImageData", "load_data", "load_image", "scan_image_folder", "unreadable_images"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class ImageData:
    """A train/validation split of one dataset, held in memory, and the test images held back.

    Attributes:
        x_train: uint8 images, shape ``(n_train, size, size, 3)``, raw 0..255 pixels.
        y_train: int32 labels in ``[0, len(class_names))``.
        x_val: uint8 validation images.
        y_val: int32 validation labels.
        class_names: Class names; label ``i`` is ``class_names[i]``.
        fingerprint: SHA-256 of the arrays, labels, class names and image size.
        source: Human-readable description of where the images came from.
        val_files: The validation images' paths relative to the folder (image folders only).
        skipped: Unreadable files left out (``data.skip_unreadable``), relative to the folder.
        x_test: uint8 images held back from every trial (``data.test_split``); none by default.
        y_test: their labels.
        x_select: uint8 images no trial trains or validates on, on which each trial's
            best-epoch model is scored for the final choice (``data.selection_split``); none by default.
        y_select: their labels.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    class_names: tuple[str, ...]
    fingerprint: str
    source: str
    val_files: tuple[str, ...] = field(default=())
    skipped: tuple[str, ...] = field(default=())
    x_test: np.ndarray = field(default_factory=lambda: np.zeros((0, 1, 1, 3), np.uint8))
    y_test: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int32))
    x_select: np.ndarray = field(default_factory=lambda: np.zeros((0, 1, 1, 3), np.uint8))
    y_select: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int32))

    @property
    def has_test_split(self) -> bool:
        """Whether images were held back from every trial (``data.test_split``)."""
        return len(self.y_test) > 0

    @property
    def has_selection_split(self) -> bool:
        """Whether images were held back for the final choice (``data.selection_split``)."""
        return len(self.y_select) > 0

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[1])

    def training_on_all_but_test(self) -> "ImageData":
        """A copy that also trains on the validation and selection images; the test split stays out.

        Its validation images are training images too, so what it validates is no held-out
        estimate. It gets a fingerprint of its own: cached features are keyed by the fingerprint,
        and its training rows are not the study's.
        """
        return dataclasses.replace(
            self,
            x_train=np.concatenate([self.x_train, self.x_val, self.x_select]),
            y_train=np.concatenate([self.y_train, self.y_val, self.y_select]),
            x_select=self.x_select[:0],
            y_select=self.y_select[:0],
            fingerprint=hashlib.sha256(f"{self.fingerprint}:training-on-all-but-test".encode()).hexdigest(),
        )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# --- image folders -----------------------------------------------------------------------


def scan_image_folder(folder: str | Path) -> list[tuple[str, list[Path]]]:
    """List an image folder: one sub-folder per class, sorted by name.

    Raises:
        ConfigError: the folder is missing, has fewer than two classes, or a class folder
            holds no image.
    """
    folder = Path(folder)
    if not folder.exists():
        raise ConfigError(f"image folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise ConfigError(f"image folder {str(folder)!r} is not a folder")
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        found = ", ".join(repr(p.name) for p in class_dirs) or "none"
        raise ConfigError(
            f"image folder {str(folder)!r} has {len(class_dirs)} class sub-folder(s) ({found}); "
            "it needs at least 2, one sub-folder of images per class"
        )
    classes = []
    for class_dir in class_dirs:
        files = list_image_files(class_dir)
        if not files:
            raise ConfigError(
                f"class folder {str(class_dir)!r} holds no image; allowed extensions: "
                f"{', '.join(IMAGE_EXTENSIONS)}"
            )
        classes.append((class_dir.name, files))
    return classes


def _select_files(folder: Path, max_per_class: int | None, seed: int):
    """``(class names, files, labels)``: every image of each class, or a seeded sample of it."""
    classes = scan_image_folder(folder)
    rng = np.random.default_rng(seed)
    files: list[Path] = []
    labels: list[int] = []
    for label, (_, class_files) in enumerate(classes):
        if max_per_class is not None and len(class_files) > max_per_class:
            picked = sorted(rng.choice(len(class_files), size=max_per_class, replace=False))
            class_files = [class_files[i] for i in picked]
        files.extend(class_files)
        labels.extend([label] * len(class_files))
    return tuple(name for name, _ in classes), files, labels


def unreadable_images(spec) -> list[UnreadableImage]:
    """Every image file of the spec's folder that cannot be decoded, found in one pass.

    Run before a study is created or touched (``launch``): with ``data.skip_unreadable`` off a
    bad file is an error that names them all; with it on they are left out. Builtin sources
    have none. Skipped when the image cache already holds these files (they decoded then).

    Raises:
        ConfigError: files are unreadable and ``data.skip_unreadable`` is off (names every one).
    """
    folder = spec.image_folder
    if folder is None:
        return []
    _, files, _ = _select_files(folder, spec.data.max_images_per_class, spec.seed)
    cache_dir = spec.image_cache_folder
    if cache_dir is not None and cache_file(cache_dir, folder, files, spec.data.image_size).is_file():
        return []
    unreadable = find_unreadable(files, workers=decode_workers())
    if unreadable and not spec.data.skip_unreadable:
        raise _unreadable_error(unreadable, folder)
    return unreadable


def _unreadable_error(unreadable: list[UnreadableImage], folder: Path) -> ConfigError:
    return ConfigError(
        describe_unreadable(unreadable, folder=folder, field="data.source")
        + "\nremove or replace them, or set data.skip_unreadable = true (--skip-unreadable) to leave them out"
    )


def _load_folder(folder: Path, image_size: int, max_per_class: int | None, seed: int,
                 cache_dir: Path | None = None, *, skip_unreadable: bool = False):
    names, files, labels = _select_files(folder, max_per_class, seed)
    failed: dict[Path, str] = {}

    def decode(path: Path) -> np.ndarray:
        try:
            return load_image(path, image_size)
        except ValueError as error:
            # Every file is tried, so one error (or one warning) names all the bad ones.
            failed[path] = str(error).removeprefix(f"{path}: ")
            return np.zeros((image_size, image_size, 3), np.uint8)

    def decode_all(paths: list[Path]) -> tuple[np.ndarray, str]:
        # Threads decode in parallel (PIL releases the GIL); with a cache folder, a later
        # process reads the decoded images back instead.
        try:
            return load_images(folder, paths, image_size, decode, cache_dir=cache_dir)
        except OSError as error:
            if cache_dir is None:
                raise
            raise ConfigError(
                f"performance.image_cache_dir: cannot use the image cache in {str(cache_dir)!r} ({error}); "
                "choose a writable folder or set performance.image_cache = false"
            ) from None

    x, status = decode_all(files)
    skipped: list[Path] = []
    if failed:
        if status == "built" and cache_dir is not None:  # its rows of the bad files are blank: never read it back
            cache_file(cache_dir, folder, files, image_size).unlink(missing_ok=True)
        unreadable = [UnreadableImage(path, failed[path]) for path in files if path in failed]
        if not skip_unreadable:
            raise _unreadable_error(unreadable, folder)
        keep = [i for i, path in enumerate(files) if path not in failed]
        skipped = [item.path for item in unreadable]
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
        x = decode_all(files)[0] if cache_dir is not None else x[keep]
        logger.warning(
            "data.skip_unreadable: left out %d unreadable image file(s) of %s (first: %s)",
            len(skipped), folder, skipped[0],
        )
    rel = [str(p.relative_to(folder)) for p in files]
    return x, np.asarray(labels, dtype=np.int32), names, rel, tuple(str(p.relative_to(folder)) for p in skipped)


# --- builtin sources ---------------------------------------------------------------------


def digits_images(image_size: int) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """scikit-learn's bundled handwritten digits (1797 images, 10 classes) as RGB images.

    The 8x8 images of 17 grey levels are scaled to 0..255 and resized bilinearly to
    ``image_size``; no download is needed.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    resized = np.stack(
        [
            np.asarray(Image.fromarray(img).resize((image_size, image_size), Image.Resampling.BILINEAR))
            for img in grey
        ]
    )
    rgb = np.repeat(resized[..., None], 3, axis=-1)
    return rgb, digits.target.astype(np.int32), tuple(str(d) for d in range(10))


def synthetic_images(
    image_size: int, num_classes: int, per_class: int, seed: int
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Noisy images whose class decides the colour and position of a bright square.

    Learnable in a few epochs, so tests can check that training does something.
    """
    rng = np.random.default_rng(seed)
    n = num_classes * per_class
    x = rng.integers(0, 60, size=(n, image_size, image_size, 3), dtype=np.uint8)
    y = np.repeat(np.arange(num_classes, dtype=np.int32), per_class)
    half = max(1, image_size // 2)
    for i, label in enumerate(y):
        channel = label % 3
        quadrant = (label // 3) % 4
        r0 = (quadrant // 2) * (image_size - half)
        c0 = (quadrant % 2) * (image_size - half)
        x[i, r0 : r0 + half, c0 : c0 + half, channel] = 200 + rng.integers(0, 55)
    return x, y, tuple(f"class_{c}" for c in range(num_classes))


def write_image_folder(folder: str | Path, x: np.ndarray, y: np.ndarray, class_names: Sequence[str]) -> Path:
    """Write images as PNG files into ``folder/<class name>/<index>.png``."""
    from PIL import Image

    folder = Path(folder)
    for name in class_names:
        (folder / name).mkdir(parents=True, exist_ok=True)
    for index, (image, label) in enumerate(zip(x, y)):
        Image.fromarray(image).save(folder / class_names[int(label)] / f"{index:05d}.png")
    return folder


# --- one entry point ---------------------------------------------------------------------


def _limit_per_class(x, y, max_per_class: int | None, seed: int):
    if max_per_class is None:
        return x, y
    rng = np.random.default_rng(seed)
    keep = []
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        if len(idx) > max_per_class:
            idx = np.sort(rng.choice(idx, size=max_per_class, replace=False))
        keep.append(idx)
    keep_idx = np.sort(np.concatenate(keep))
    return x[keep_idx], y[keep_idx]


def fingerprint_arrays(*arrays: np.ndarray, extra: Sequence[str] = ()) -> str:
    """SHA-256 over arrays (shape, dtype and bytes) and extra strings."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(str((array.shape, array.dtype.str)).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    for item in extra:
        digest.update(b"\0" + item.encode())
    return digest.hexdigest()


def split_stratified(
    x: np.ndarray, y: np.ndarray, *, fraction: float, seed: int, names: Sequence[str] | None = None,
    field: str = "data.validation_split", part: str = "validation",
):
    """Seeded stratified split into a kept part and a ``fraction`` part.

    Args:
        field: The spec field that set ``fraction`` (for the error).
        part: What the fraction part is for (``validation``, ``test``), for the error.

    Returns:
        ``(x_kept, y_kept, x_part, y_part, kept_names, part_names)`` (names only with ``names``).

    Raises:
        ConfigError: a class has too few images for both parts.
    """
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y)
    if counts.min() < 2:
        raise ConfigError(
            f"data: class index {int(counts.argmin())} has {int(counts.min())} image(s); each class needs "
            f"at least 2 (one for training, one for {part})"
        )
    index = np.arange(len(y))
    try:
        kept_idx, part_idx = train_test_split(index, test_size=fraction, random_state=seed, stratify=y)
    except ValueError as error:
        raise ConfigError(
            f"{field}: got {fraction}; with {len(y)} images in {len(counts)} classes "
            f"the split cannot give each class a training and a {part} image ({error})"
        ) from None
    kept_idx, part_idx = np.sort(kept_idx), np.sort(part_idx)
    kept_names = tuple(names[i] for i in kept_idx) if names is not None else ()
    part_names = tuple(names[i] for i in part_idx) if names is not None else ()
    return x[kept_idx], y[kept_idx], x[part_idx], y[part_idx], kept_names, part_names


#: The test split is drawn with its own seed, so that it never follows the validation split's.
TEST_SPLIT_SEED_OFFSET = 7919
#: So is the selection split, so that it follows neither.
SELECTION_SPLIT_SEED_OFFSET = 104729


def _hold_back(x: np.ndarray, y: np.ndarray, files: list[str] | None, *, fraction: float, seed: int, field: str, part: str):
    """``(x, y, files)`` left after holding ``fraction`` of the images back, and the held-back
    ``(x, y)`` (none when ``fraction`` is 0); see :func:`split_stratified` for the arguments."""
    if fraction <= 0:
        return x, y, files, np.zeros((0, *x.shape[1:]), x.dtype), np.zeros((0,), y.dtype)
    x, y, x_part, y_part, kept_files, _ = split_stratified(x, y, fraction=fraction, seed=seed, names=files, field=field, part=part)
    return x, y, (list(kept_files) if files is not None else None), x_part, y_part


def load_data(spec) -> ImageData:
    """Load the images a study spec names and split them.

    The fingerprint covers exactly the images used: with ``data.skip_unreadable`` the
    unreadable files are left out of it, so a resumed study sees the same set.

    Args:
        spec: A :class:`~autofinetune.spec.StudySpec`.
    """
    data = spec.data
    size = data.image_size
    files: list[str] | None = None
    skipped: tuple[str, ...] = ()
    if data.source == "digits":
        x, y, names = digits_images(size)
        x, y = _limit_per_class(x, y, data.max_images_per_class, spec.seed)
        source = "digits (scikit-learn handwritten digits)"
    elif data.source == "synthetic":
        x, y, names = synthetic_images(size, data.synthetic_classes, data.synthetic_images_per_class, spec.seed)
        x, y = _limit_per_class(x, y, data.max_images_per_class, spec.seed)
        source = "synthetic"
    else:
        folder = spec.image_folder
        x, y, names, files, skipped = _load_folder(
            folder, size, data.max_images_per_class, spec.seed, cache_dir=spec.image_cache_folder,
            skip_unreadable=data.skip_unreadable,
        )
        source = str(folder)
    # Held back first, from all images, then the final choice's from what is left: no trial
    # trains or validates on either.
    x, y, files, x_test, y_test = _hold_back(
        x, y, files, fraction=data.test_split, seed=spec.seed + TEST_SPLIT_SEED_OFFSET, field="data.test_split", part="test",
    )
    x, y, files, x_select, y_select = _hold_back(
        x, y, files, fraction=data.selection_split, seed=spec.seed + SELECTION_SPLIT_SEED_OFFSET,
        field="data.selection_split", part="selection",
    )
    x_train, y_train, x_val, y_val, _, val_files = split_stratified(
        x, y, fraction=data.validation_split, seed=spec.seed, names=files
    )
    # A study without a test or selection split keeps the fingerprint it always had.
    held_back = tuple(part for pair in ((x_test, y_test), (x_select, y_select)) if len(pair[1]) for part in pair)
    fingerprint = fingerprint_arrays(x_train, y_train, x_val, y_val, *held_back, extra=names)
    return ImageData(
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        class_names=tuple(names),
        fingerprint=fingerprint,
        source=source,
        val_files=val_files,
        skipped=skipped,
        x_test=x_test,
        y_test=y_test,
        x_select=x_select,
        y_select=y_select,
    )
