"""Decoded images of an image folder, kept on disk so the next process skips decoding.

Decoding and resizing JPEGs costs far more CPU than a training step's input needs, and every
trial process (every Optuna worker) would otherwise pay it again. The cache is one uint8
``.npy`` file per (folder, image size, list of files), read back memory-mapped:

* its name holds a key of the folder's resolved path, the image size, the resampling and
  every file's relative path, size and modification time (ns), so a changed, added or
  removed file, or another image size, never reads stale pixels;
* it is written to a temporary name and renamed into place, so a process that reads it
  never sees half a file, and two processes that build it at once both end with a whole one;
* when a rebuild replaces it (a file changed), the old file of the same slot is removed;
* it is skipped, with a warning, when the disk lacks room for it ("where it fits").
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np

logger = logging.getLogger(__name__)

#: Bumped when the decoding changes (resampling, colour handling), so old caches are not read.
CACHE_FORMAT = 2  # 2: EXIF orientation applied, 16-bit images scaled
RESAMPLING = "bilinear"
#: Free disk space kept beyond the cache file itself.
DISK_MARGIN_BYTES = 256 * 2**20

CacheStatus = Literal["hit", "built", "skipped", "off"]


def decode_workers() -> int:
    """Threads that decode images at once (PIL releases the GIL while decoding and resizing)."""
    return min(16, os.cpu_count() or 1)


def decode_into(out: np.ndarray, files: Sequence[Path], decode: Callable[[Path], np.ndarray]) -> np.ndarray:
    """Decode ``files`` into the rows of ``out`` with a thread pool.

    Args:
        out: A ``(len(files), size, size, 3)`` uint8 array (in memory or memory-mapped).
        files: Image files, in row order.
        decode: Turns one path into a ``(size, size, 3)`` uint8 array.

    Returns:
        ``out``.
    """

    def one(item: tuple[int, Path]) -> None:
        index, path = item
        out[index] = decode(path)

    with ThreadPoolExecutor(max_workers=decode_workers()) as pool:
        # list() re-raises the first decoding error here, naming its file.
        list(pool.map(one, enumerate(files)))
    return out


def cache_file(cache_dir: Path, folder: Path, files: Sequence[Path], image_size: int) -> Path:
    """The cache file of exactly these files of ``folder`` at ``image_size`` pixels.

    Args:
        cache_dir: Folder of the cache.
        folder: The image folder (the files' common root).
        files: The image files to decode, in row order.
        image_size: Height and width of the decoded images.
    """
    names = [str(Path(f).relative_to(folder)) for f in files]
    slot = hashlib.sha256(
        json.dumps([CACHE_FORMAT, str(folder.resolve()), image_size, RESAMPLING, names]).encode()
    ).hexdigest()[:20]
    stats = [os.stat(f) for f in files]
    content = hashlib.sha256(
        json.dumps([slot, [(st.st_size, st.st_mtime_ns) for st in stats]]).encode()
    ).hexdigest()[:20]
    return cache_dir / f"{slot}-{content}.npy"


def _read(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        # Missing, removed by a concurrent rebuild, or truncated: build it again.
        return None
    if array.shape != shape or array.dtype != np.uint8:
        return None
    return array


def _has_room(cache_dir: Path, nbytes: int) -> bool:
    return shutil.disk_usage(cache_dir).free >= nbytes + DISK_MARGIN_BYTES


def load_images(
    folder: Path,
    files: Sequence[Path],
    image_size: int,
    decode: Callable[[Path], np.ndarray],
    *,
    cache_dir: Path | None,
) -> tuple[np.ndarray, CacheStatus]:
    """Decoded images of ``files``, from the cache when it holds them.

    Args:
        folder: The image folder the files are in.
        files: Image files, in row order.
        image_size: Height and width of the decoded images.
        decode: Turns one path into a ``(size, size, 3)`` uint8 array; its errors propagate.
        cache_dir: Folder of the cache, or ``None`` to decode without caching.

    Returns:
        The ``(len(files), size, size, 3)`` uint8 images (memory-mapped when they come from
        the cache) and what the cache did: ``"hit"``, ``"built"``, ``"skipped"`` (no room on
        disk) or ``"off"``.

    Raises:
        OSError: the cache folder cannot be created or written.
    """
    shape = (len(files), image_size, image_size, 3)
    if cache_dir is None or not files:
        return decode_into(np.empty(shape, np.uint8), files, decode), "off"
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_file(cache_dir, folder, files, image_size)
    cached = _read(path, shape)
    if cached is not None:
        logger.info("read %d decoded images of %s from %s", len(files), folder, path)
        return cached, "hit"
    nbytes = int(np.prod(shape))
    if not _has_room(cache_dir, nbytes):
        logger.warning(
            "not caching the decoded images of %s: %.1f MiB do not fit on the disk of %s",
            folder, nbytes / 2**20, cache_dir,
        )
        return decode_into(np.empty(shape, np.uint8), files, decode), "skipped"
    # A hidden temporary name that the slot's pattern below never matches.
    temporary = cache_dir / f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.npy"
    try:
        out = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.uint8, shape=shape)
        decode_into(out, files, decode)
        out.flush()
        del out
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    slot = path.name.split("-")[0]
    for stale in cache_dir.glob(f"{slot}-*.npy"):
        if stale != path:
            stale.unlink(missing_ok=True)
    logger.info("decoded %d images of %s into %s", len(files), folder, path)
    built = _read(path, shape)
    if built is None:  # replaced by another process between our rename and this read
        return decode_into(np.empty(shape, np.uint8), files, decode), "built"
    return built, "built"
