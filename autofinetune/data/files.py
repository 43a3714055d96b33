"""Image files as users have them: listing a folder, decoding every kind, naming the bad ones.

Real folders hold more than images: ``.DS_Store``, ``Thumbs.db``, hidden files, notes. Those are
skipped silently (by name and extension). Images come in many modes: grayscale, palette, RGBA,
16-bit PNG, CMYK JPEG, phone photos rotated by an EXIF tag. All decode to the same upright
``(size, size, 3)`` uint8 RGB array. A file that cannot be decoded (truncated, empty, not an
image) is found by :func:`find_unreadable`, which checks every file in one pass, so a user fixes
a folder once instead of file by file.
"""

from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
#: Files that system tools leave in image folders; never images, whatever their extension.
IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini", ".ds_store"})
#: How many unreadable files an error message names; the rest go to a file.
LISTED_IN_MESSAGE = 20


def is_image_file(path: Path, root: Path) -> bool:
    """Whether ``path`` (under ``root``) counts as an image: a file with an image extension,
    not hidden (no part of its path below ``root`` starts with a dot), not a system file."""
    relative = path.relative_to(root).parts
    return (
        path.suffix.lower() in IMAGE_EXTENSIONS
        and path.name.lower() not in IGNORED_NAMES
        and not any(part.startswith(".") for part in relative)
        and path.is_file()
    )


def list_image_files(folder: Path) -> list[Path]:
    """The image files below ``folder`` (recursively), sorted; see :func:`is_image_file`."""
    return sorted(p for p in folder.rglob("*") if is_image_file(p, folder))


def _to_rgb(image):
    """Any PIL image as RGB: 16-bit scaled to 8 bits, palette transparency resolved, alpha dropped."""
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit greyscale: PIL's convert("RGB") clips at 255 instead of scaling the range.
        values = np.asarray(image, dtype=np.float64)
        maximum = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        grey = np.clip(np.rint(values * (255.0 / maximum)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "F":
        return Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns when a palette with transparency goes to RGB directly
    return image.convert("RGB")  # L, LA, P, RGBA (alpha dropped), CMYK, YCbCr, 1


def load_image(path: str | Path, image_size: int) -> np.ndarray:
    """Decode one image file to an upright ``(size, size, 3)`` uint8 RGB array.

    EXIF orientation is applied (a portrait phone photo stays portrait); every colour mode
    becomes RGB; 16-bit images are scaled to 8 bits.

    Raises:
        ValueError: the file is not a readable image (the message names the file).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            image = _to_rgb(ImageOps.exif_transpose(opened))
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        reason = "empty file" if _is_empty(path) else str(error)
        raise ValueError(f"{path}: not a readable image ({reason})") from None


def _is_empty(path: str | Path) -> bool:
    try:
        return Path(path).stat().st_size == 0
    except OSError:
        return False


def check_image(path: Path) -> str | None:
    """``None`` when the file decodes completely, else why not (as :func:`load_image` says it).

    JPEGs decode at reduced scale (``draft``), which still reads every byte, so a truncated
    file is found at a fraction of a full decode's cost.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.draft("RGB", (64, 64))
            image.load()
        return None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return f"not a readable image ({'empty file' if _is_empty(path) else error})"


@dataclass(frozen=True)
class UnreadableImage:
    """A file that looks like an image by its name but cannot be decoded."""

    path: Path
    reason: str


def find_unreadable(files: Sequence[Path], *, workers: int = 8) -> list[UnreadableImage]:
    """Check every file (in parallel threads; PIL releases the GIL) and return the bad ones, in order."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        reasons = list(pool.map(check_image, files))
    return [UnreadableImage(Path(path), reason) for path, reason in zip(files, reasons) if reason is not None]


def describe_unreadable(unreadable: Sequence[UnreadableImage], *, folder: Path, field: str) -> str:
    """One message naming every unreadable file: the count, the first 20, the rest in a file.

    The full list (every path and reason) is written to a temporary text file when there are
    more than :data:`LISTED_IN_MESSAGE`; the message names it.
    """
    count = len(unreadable)
    lines = [f"{field}: {count} unreadable image file(s) in {str(folder)!r}:"]
    lines += [f"  {item.path}: {item.reason}" for item in unreadable[:LISTED_IN_MESSAGE]]
    if count > LISTED_IN_MESSAGE:
        with tempfile.NamedTemporaryFile(
            "w", prefix="autofinetune-unreadable-", suffix=".txt", delete=False, encoding="utf-8"
        ) as listing:
            listing.writelines(f"{item.path}\t{item.reason}\n" for item in unreadable)
        lines.append(f"  ... and {count - LISTED_IN_MESSAGE} more; all {count} are listed in {listing.name}")
    return "\n".join(lines)


def readable_by_others(path: str | Path) -> None:
    """Give a file or folder the permissions the user's umask gives a new one (0644 and 0755
    under the usual 022). Files made with :mod:`tempfile` are owner-only (0600, 0700); an
    export or a report renamed from one is meant to be shared."""
    import os

    mask = os.umask(0)
    os.umask(mask)  # read, and put back: there is no other way to read the umask
    path = Path(path)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)

