"""What identifies an entry of the feature cache: everything its activations depend on.

Anything that changes the features changes the :class:`FeatureKey` -- backbone, weights identity
(a file hash, or ``none`` + seed), image size, the data fingerprint, the cut, the storage dtype
and the compute policy -- so a changed key is a different entry (invalidation), never a stale read.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

#: Bumped when the stored layout changes, so old entries are never misread.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class FeatureKey:
    """Everything the cached activations depend on.

    Attributes:
        backbone: Registered backbone name.
        weights: Weights identity, see :func:`weights_identity`.
        image_size: Input size in pixels.
        data: Fingerprint of the train/validation arrays (:attr:`ImageData.fingerprint`).
        layer: The cut: ``"avg_pool"`` or a layer name such as ``"conv4_block6_out"``.
        dtype: Storage dtype, ``"float32"`` or ``"float16"``.
        compute: Backend and dtype policy the features were computed with.
    """

    backbone: str
    weights: str
    image_size: int
    data: str
    layer: str
    dtype: str
    compute: str = ""

    def digest(self) -> str:
        text = json.dumps({"format": FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def stem(self) -> str:
        """File name without extension: readable prefix + hash of the whole key. A character a
        file name may not hold everywhere (a ``module:function`` backbone's colon) becomes ``_``;
        the hash keeps keys apart."""
        readable = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{self.backbone}-{self.image_size}px-{self.layer}-{self.dtype}")
        return f"{readable}-{self.digest()[:24]}"


#: Known file hashes, by (path, size, modification time): a cache's own (see :class:`FeatureCache`).
FileHashes = dict[tuple[str, int, int], str]


def file_sha256(path: str | Path, known: FileHashes | None = None) -> str:
    """SHA-256 of a file, looked up in and added to ``known`` (by path, size and mtime), so the
    trials of one cache do not rehash a weights file."""
    path = Path(path)
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if known is not None and memo in known:
        return known[memo]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    if known is not None:
        known[memo] = digest.hexdigest()
    return digest.hexdigest()


def weights_identity(spec, known: FileHashes | None = None) -> str:
    """What the backbone's weights are, as a string that changes whenever they change.

    A weights file: its SHA-256. ``"imagenet"``: the hash of Keras's downloaded file where it
    exists. ``"none"``: the seed (every trial builds the backbone right after seeding), the
    Keras version and backend (random initializers differ between them). A user's
    ``module:function`` backbone adds its module file's SHA-256: an edited function builds
    another network, whose features are never read from the old one's entries.

    Args:
        spec: A :class:`~autofinetune.spec.StudySpec`.
        known: File hashes computed before (see :func:`file_sha256`).
    """
    code = spec.backbone_info().source_sha256
    return _weights(spec, known) + (f":code={code}" if code else "")


def _weights(spec, known: FileHashes | None) -> str:
    import keras

    path = spec.weights_path
    if path is not None:
        return f"file:sha256={file_sha256(path, known)}"
    if spec.backbone.weights == "imagenet":
        from autofinetune.trial.backbones import keras_weights_cache_dir

        weights_file = spec.backbone_info().weights_file
        downloaded = keras_weights_cache_dir() / weights_file
        if weights_file and downloaded.is_file():
            return f"imagenet:sha256={file_sha256(downloaded, known)}"
        return f"imagenet:keras={keras.__version__}"
    return f"none:seed={spec.seed}:keras={keras.__version__}:backend={keras.backend.backend()}"


def feature_key(spec, data, layer: str, *, float16: bool = False, known: FileHashes | None = None) -> FeatureKey:
    """The key of the features of ``data`` at cut ``layer`` for the spec's backbone.

    Args:
        spec: The study spec (backbone, weights, seed).
        data: The :class:`~autofinetune.data.sources.ImageData` the features are computed from.
        layer: The cut, see :func:`autofinetune.trial.model.frozen_cut`.
        float16: Whether the features are stored as float16.
        known: File hashes computed before (a cache's, see :meth:`FeatureCache.key_for`).
    """
    import keras

    return FeatureKey(
        backbone=spec.backbone.name,
        weights=weights_identity(spec, known),
        image_size=data.image_size,
        data=data.fingerprint,
        layer=layer,
        dtype="float16" if float16 else "float32",
        compute=f"{keras.backend.backend()}:{keras.config.dtype_policy().name}",
    )
