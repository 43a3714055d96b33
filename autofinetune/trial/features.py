"""The frozen-feature cache: pay for the frozen part of the backbone once per study.

In phase 1 the backbone is frozen and runs in inference mode, so what it makes of an image never
changes; in phase 2 with unfreeze depth ``k`` the same holds for everything below the first
unfrozen block. This module stores those activations -- for every training and validation image,
at one cut of the network (:func:`autofinetune.trial.model.frozen_cut`) -- in ``.npy`` files that every
trial and every worker process of a study memory-maps instead of recomputing them.

An entry is identified by a :class:`~autofinetune.trial.feature_keys.FeatureKey` of everything
its activations depend on, so a changed key is a different entry (invalidation), never a stale read.

Concurrency: an entry is written under a temporary name, fsynced and published with
``os.replace``, so a reader sees either no file or a complete one. Workers that need the same
missing entry take a per-entry file lock (:mod:`filelock`): one computes, the others wait and
then read it. Where locks do not work (some network file systems) both compute and the
last ``os.replace`` wins -- with identical content, so the cache stays valid.

The folder has a disk budget; when a new entry does not fit, the least recently used entries are
deleted (POSIX keeps a deleted file readable for processes that still have it mapped).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Collection, Iterator, Sequence

import numpy as np
from filelock import FileLock

from autofinetune.trial.feature_keys import FeatureKey, FileHashes, feature_key

#: Environment variable that overrides the spec's cache folder (as AUTOFINETUNE_STORAGE does storage).
CACHE_DIR_ENV = "AUTOFINETUNE_CACHE_DIR"
DEFAULT_CACHE_DIR = "autofinetune-cache"
DEFAULT_MAX_BYTES = 10 * 2**30
#: Images per forward pass when computing features (inference only, so larger than a train batch).
FEATURE_BATCH_SIZE = 64
#: Temporary files older than this are leftovers of a crashed worker.
_STALE_TEMP_SECONDS = 24 * 3600


def default_cache_dir() -> Path:
    """``$AUTOFINETUNE_CACHE_DIR``, else ``autofinetune-cache/`` in the working directory."""
    return Path(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR)


# --- the cache folder -------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheEntry:
    """One stored feature array."""

    path: Path
    bytes: int
    last_used: float


@dataclass(frozen=True)
class Lookup:
    """The answer of :meth:`FeatureCache.get_or_compute`.

    Attributes:
        array: The features, shape ``(rows, ...)``; memory-mapped when read from disk.
        hit: ``True`` when read from the cache, ``False`` when computed now.
        stored: Whether the array is on disk (``False``: larger than the whole disk budget).
        path: The entry's file, when stored.
        seconds: Time spent computing (0 on a hit).
    """

    array: np.ndarray
    hit: bool
    stored: bool
    path: Path | None
    seconds: float


class FeatureCache:
    """A folder of feature arrays shared by every trial and worker of a study.

    Args:
        directory: The cache folder; created on first write. Defaults to
            :func:`default_cache_dir`.
        float16: Store features as float16 (half the disk; no longer bit-exact).
        max_bytes: Disk budget of the folder; least recently used entries are deleted to fit.
        file_locks: Take a per-entry file lock while computing a missing entry. ``False`` (a
            file system whose locks hang): workers missing the same entry both compute it, and
            the atomic replace still leaves one whole file.
    """

    def __init__(
        self,
        directory: str | Path | None = None,
        *,
        float16: bool = False,
        max_bytes: int = DEFAULT_MAX_BYTES,
        file_locks: bool = True,
    ) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, but got {max_bytes}")
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.float16 = float16
        self.max_bytes = int(max_bytes)
        self.file_locks = file_locks
        #: The weight files this cache's keys named, hashed once (a ResNet50 file is ~90 MB).
        self.file_hashes: FileHashes = {}

    @classmethod
    def from_spec(cls, spec, *, directory: str | Path | None = None) -> "FeatureCache":
        """The cache a spec's ``[cache]`` section describes.

        The folder is, in order: ``directory``, ``$AUTOFINETUNE_CACHE_DIR``, the spec's
        ``cache.dir`` (relative to the spec file), ``./autofinetune-cache``.
        """
        folder = directory or os.environ.get(CACHE_DIR_ENV) or spec.cache_dir or DEFAULT_CACHE_DIR
        return cls(folder, float16=spec.cache.float16, max_bytes=spec.cache.max_bytes)

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.directory)!r}, float16={self.float16}, max_bytes={self.max_bytes})"

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float16 if self.float16 else np.float32)

    def key_for(self, spec, data, layer: str) -> FeatureKey:
        """The key of ``data``'s features at cut ``layer`` in this cache (see :func:`feature_key`)."""
        return feature_key(spec, data, layer, float16=self.float16, known=self.file_hashes)

    def path_of(self, key: FeatureKey) -> Path:
        return self.directory / f"{key.stem}.npy"

    # -- reading and writing -------------------------------------------------------------------

    def load(self, key: FeatureKey, shape: tuple[int, ...]) -> np.ndarray | None:
        """The stored array of ``key`` (memory-mapped), or ``None`` if absent or unusable.

        Marks the entry as just used (for LRU eviction).
        """
        path = self.path_of(key)
        try:
            array = np.load(path, mmap_mode="r")
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            return None  # truncated or foreign file: recompute and replace it
        if tuple(array.shape) != tuple(shape) or array.dtype != self.dtype:
            return None
        with contextlib.suppress(OSError):
            os.utime(path)
        return array

    def get_or_compute(
        self,
        key: FeatureKey,
        shape: tuple[int, ...],
        fill: Callable[[np.ndarray], None],
    ) -> Lookup:
        """Read the entry of ``key``, or compute it with ``fill`` and store it.

        Args:
            key: What the array holds.
            shape: The array's shape, rows first.
            fill: Writes the features into the array it is given (a memory map of the new
                file, in :attr:`dtype`).
        """
        return self.get_or_compute_many([(key, shape)], lambda outs: fill(outs[0]))[0]  # type: ignore[arg-type]

    def get_or_compute_many(
        self,
        wanted: Sequence[tuple[FeatureKey, tuple[int, ...]]],
        fill: Callable[[list[np.ndarray | None]], None],
    ) -> list[Lookup]:
        """Read the entries of ``wanted``; compute the missing ones together with one ``fill``.

        Several cuts of one network come out of one pass over the images: ``fill`` is called
        at most once, and only when an entry is missing.

        Args:
            wanted: ``(key, shape)`` of each entry, shapes rows first.
            fill: Writes each missing entry's features into the array at its position in the
                list it is given (a memory map of the new file, in :attr:`dtype`, or an
                in-memory array for one larger than the whole disk budget); ``None`` stands
                where the entry was found.

        Returns:
            One :class:`Lookup` per entry of ``wanted``, in its order. The entries computed now
            all carry the one pass's time.
        """
        for key, _ in wanted:
            if key.dtype != self.dtype.name:
                raise ValueError(f"key dtype {key.dtype!r} does not match the cache's {self.dtype.name!r}")
        found: list[Lookup | None] = [self._hit(key, shape) for key, shape in wanted]
        if all(lookup is not None for lookup in found):
            return found  # type: ignore[return-value]
        sizes = [int(np.prod(shape)) * self.dtype.itemsize for _, shape in wanted]
        # Larger than the whole budget: still worth computing once for this trial's epochs.
        storable = [i for i, lookup in enumerate(found) if lookup is None and sizes[i] <= self.max_bytes]
        with contextlib.ExitStack() as locks:
            if storable:
                self.directory.mkdir(parents=True, exist_ok=True)
            # One order for every worker, so two that want overlapping entries never deadlock.
            for i in sorted(storable, key=lambda i: wanted[i][0].stem):
                locks.enter_context(self._lock(wanted[i][0]))
            for i in storable:
                # Another worker may have written it while this one waited for the lock.
                found[i] = self._hit(*wanted[i])
            missing = [i for i, lookup in enumerate(found) if lookup is None]
            if not missing:
                return found  # type: ignore[return-value]
            to_store = [i for i in missing if sizes[i] <= self.max_bytes]
            started = time.perf_counter()
            if to_store:
                self.evict(sum(sizes[i] for i in to_store), keep={self.path_of(key) for key, _ in wanted})
            outs: list[np.ndarray | None] = [None] * len(wanted)
            temps: dict[int, Path] = {}
            try:
                for i in missing:
                    key, shape = wanted[i]
                    if i in to_store:
                        temps[i] = self._temp_path(key)
                        outs[i] = np.lib.format.open_memmap(temps[i], mode="w+", dtype=self.dtype, shape=shape)
                    else:
                        outs[i] = np.empty(shape, self.dtype)
                fill(outs)
                for i, temp in temps.items():
                    outs[i].flush()  # type: ignore[union-attr]
                    outs[i] = None
                    self._publish(wanted[i][0], wanted[i][1], temp)
            except BaseException:
                for temp in temps.values():
                    with contextlib.suppress(OSError):
                        temp.unlink()
                raise
            seconds = time.perf_counter() - started
        for i in missing:
            key, shape = wanted[i]
            if i in temps:
                found[i] = Lookup(np.load(self.path_of(key), mmap_mode="r"), hit=False, stored=True,
                                  path=self.path_of(key), seconds=seconds)
            else:
                found[i] = Lookup(outs[i], hit=False, stored=False, path=None, seconds=seconds)  # type: ignore[arg-type]
        return found  # type: ignore[return-value]

    def _hit(self, key: FeatureKey, shape: tuple[int, ...]) -> Lookup | None:
        array = self.load(key, shape)
        if array is None:
            return None
        return Lookup(array, hit=True, stored=True, path=self.path_of(key), seconds=0.0)

    def _temp_path(self, key: FeatureKey) -> Path:
        handle, temp_name = tempfile.mkstemp(dir=self.directory, prefix=f".{key.stem}.", suffix=".tmp")
        os.close(handle)
        return Path(temp_name)

    def _publish(self, key: FeatureKey, shape: tuple[int, ...], temp: Path) -> Path:
        """Make a filled temporary file the entry of ``key``, atomically, with its metadata."""
        final = self.path_of(key)
        _fsync_file(temp)
        os.replace(temp, final)  # atomic: readers see no file or the whole file
        _fsync_dir(self.directory)
        meta = {"key": asdict(key), "shape": list(shape), "created": time.time()}
        _atomic_write_text(final.with_suffix(".json"), json.dumps(meta, indent=2))
        return final

    @contextlib.contextmanager
    def _lock(self, key: FeatureKey) -> Iterator[None]:
        if not self.file_locks:
            yield
            return
        lock = FileLock(self.directory / f".{key.stem}.lock")
        try:
            lock.acquire()
        except NotImplementedError:  # a file system without locks: workers may both compute, still valid
            yield
            return
        try:
            yield
        finally:
            lock.release()

    # -- budget ----------------------------------------------------------------------------------

    def entries(self) -> list[CacheEntry]:
        """Stored arrays, least recently used first."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.glob("*.npy"):
            with contextlib.suppress(FileNotFoundError):
                stat = path.stat()
                found.append(CacheEntry(path=path, bytes=stat.st_size, last_used=stat.st_mtime))
        return sorted(found, key=lambda entry: (entry.last_used, entry.path.name))

    def total_bytes(self) -> int:
        return sum(entry.bytes for entry in self.entries())

    def evict(self, incoming: int, *, keep: Collection[Path] = ()) -> list[Path]:
        """Delete least recently used entries until ``incoming`` more bytes fit the budget.

        Args:
            incoming: Bytes about to be written.
            keep: Entries never deleted (those the caller is about to read or write).

        Returns:
            The deleted files.
        """
        self._remove_stale_temps()
        entries = [entry for entry in self.entries() if entry.path not in keep]
        total = sum(entry.bytes for entry in entries)
        removed = []
        for entry in entries:
            if total + incoming <= self.max_bytes:
                break
            with contextlib.suppress(FileNotFoundError):  # another worker may have evicted it
                entry.path.unlink()
                removed.append(entry.path)
            with contextlib.suppress(FileNotFoundError):
                entry.path.with_suffix(".json").unlink()
            total -= entry.bytes
        return removed

    def _remove_stale_temps(self) -> None:
        now = time.time()
        for temp in self.directory.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                if now - temp.stat().st_mtime > _STALE_TEMP_SECONDS:
                    temp.unlink()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not every platform can open a folder.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temp_name, path)


# --- features of a dataset --------------------------------------------------------------------


@dataclass(frozen=True)
class Features:
    """Cached activations of a dataset's training and validation images.

    Attributes:
        layer: The cut they were taken at.
        train: One row per training image, in the order of ``data.x_train``.
        val: One row per validation image, in the order of ``data.x_val``.
        hit: Read from the cache (``True``) or computed now (``False``).
        stored: Whether they are on disk.
        seconds: Time spent computing them (0 on a hit).
        path: The cache file, when stored.
    """

    layer: str
    train: np.ndarray
    val: np.ndarray
    hit: bool
    stored: bool
    seconds: float
    path: Path | None = None


def cached_features(
    cache: FeatureCache,
    key: FeatureKey,
    extractor,
    data,
    *,
    batch_size: int = FEATURE_BATCH_SIZE,
) -> Features:
    """The features of ``data``'s images at ``key``'s cut: from the cache, or computed and stored.

    Training rows come first, then validation rows, in one array.

    Args:
        cache: Where features live.
        key: Their identity (see :func:`feature_key`).
        extractor: The frozen prefix, raw images -> activations
            (:func:`autofinetune.trial.model.build_feature_extractor`).
        data: The :class:`~autofinetune.data.sources.ImageData`.
        batch_size: Images per forward pass.
    """
    return cached_features_together(cache, [key], extractor, data, batch_size=batch_size)[0]


def cached_features_together(
    cache: FeatureCache,
    keys: Sequence[FeatureKey],
    extractor,
    data,
    *,
    batch_size: int = FEATURE_BATCH_SIZE,
) -> list[Features]:
    """The features of ``data``'s images at several cuts, the missing ones computed in one pass.

    Args:
        cache: Where features live.
        keys: One per cut (see :func:`feature_key`).
        extractor: Raw images -> one output per key, in the order of ``keys``
            (:func:`autofinetune.trial.model.build_cuts_extractor`; a single output for one key).
        data: The :class:`~autofinetune.data.sources.ImageData`.
        batch_size: Images per forward pass.
    """
    n_train, n_val = len(data.x_train), len(data.x_val)
    n = n_train + n_val
    output_shapes = extractor.output_shape if len(keys) > 1 else [extractor.output_shape]
    if len(output_shapes) != len(keys):
        raise ValueError(f"the extractor has {len(output_shapes)} outputs for {len(keys)} keys")
    shapes = [(n, *(int(d) for d in shape[1:])) for shape in output_shapes]
    batch_size = max(1, min(batch_size, n))

    def images(start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the training images followed by the validation images."""
        parts = []
        if start < n_train:
            parts.append(data.x_train[start : min(stop, n_train)])
        if stop > n_train:
            parts.append(data.x_val[max(start - n_train, 0) : stop - n_train])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def fill(outs: list[np.ndarray | None]) -> None:
        for start in range(0, n, batch_size):
            batch = images(start, min(start + batch_size, n))
            rows = len(batch)
            if rows < batch_size:
                # Pad the last batch: one batch shape means one trace of the predict function,
                # and inference treats each image on its own, so the padding changes nothing.
                batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - rows, axis=0)])
            predicted = extractor.predict_on_batch(batch)
            if len(keys) == 1:
                predicted = [predicted]
            for out, values in zip(outs, predicted):
                if out is not None:
                    out[start : start + rows] = np.asarray(values)[:rows].astype(out.dtype)

    found = cache.get_or_compute_many(list(zip(keys, shapes)), fill)
    return [
        Features(
            layer=key.layer,
            train=lookup.array[:n_train],
            val=lookup.array[n_train:],
            hit=lookup.hit,
            stored=lookup.stored,
            seconds=lookup.seconds,
            path=lookup.path,
        )
        for key, lookup in zip(keys, found)
    ]
