"""Where trial checkpoints go: a folder beside the study database, a shared folder, or a bucket."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from autofinetune.errors import ConfigError
from autofinetune.store.database import sqlite_path

ARTIFACTS_ENV = "AUTOFINETUNE_ARTIFACTS"


def artifacts_location(storage_url: str, override: str | None = None) -> str:
    """Where trial checkpoints go: ``--artifacts``, ``$AUTOFINETUNE_ARTIFACTS``, else beside the DB.

    For a SQLite database ``x.db`` that is the folder ``x.db.artifacts`` next to it; for a
    server database, ``autofinetune-artifacts`` in the working directory (on a cluster, point
    it at shared storage: a shared folder, ``s3://bucket/prefix`` or ``gs://bucket/prefix``).
    """
    chosen = override or os.environ.get(ARTIFACTS_ENV)
    if chosen:
        return chosen
    path = sqlite_path(storage_url)
    if path is not None:
        return str(path.with_name(path.name + ".artifacts"))
    return str(Path("autofinetune-artifacts").resolve())


def check_artifact_store(location: str) -> None:
    """Refuse an artifact folder that cannot be created or written to, before the study exists.

    A file is created and removed there (no bytes: a full disk is a warning on the trials that
    meet it, not a refusal). Bucket URIs are left to their first upload.

    Raises:
        ConfigError: naming the folder and why it cannot be written.
    """
    if location.startswith(("s3://", "gs://")):
        return
    try:
        Path(location).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=location, prefix=".autofinetune-probe-"):
            pass
    except OSError as error:
        raise ConfigError(
            f"artifacts: cannot write to {location!r} ({error.strerror or error}); give --artifacts (or "
            f"${ARTIFACTS_ENV}) a folder this user can create and write, or an s3:// or gs:// URI"
        ) from None


def open_artifact_store(location: str):
    """An Optuna artifact store for a folder, ``s3://bucket/prefix`` or ``gs://bucket/prefix``."""
    from optuna.artifacts import Boto3ArtifactStore, FileSystemArtifactStore, GCSArtifactStore

    if location.startswith("s3://"):
        bucket, _, prefix = location[5:].partition("/")
        return _PrefixedStore(Boto3ArtifactStore(bucket), prefix)
    if location.startswith("gs://"):
        bucket, _, prefix = location[5:].partition("/")
        return _PrefixedStore(GCSArtifactStore(bucket), prefix)
    Path(location).mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(location)


class _PrefixedStore:
    """Keeps a study's artifacts under a key prefix of a shared bucket."""

    def __init__(self, store, prefix: str) -> None:
        self._store = store
        self._prefix = prefix.strip("/")

    def _key(self, artifact_id: str) -> str:
        return f"{self._prefix}/{artifact_id}" if self._prefix else artifact_id

    def open_reader(self, artifact_id: str):
        return self._store.open_reader(self._key(artifact_id))

    def write(self, artifact_id: str, content_body) -> None:
        self._store.write(self._key(artifact_id), content_body)

    def remove(self, artifact_id: str) -> None:
        self._store.remove(self._key(artifact_id))
