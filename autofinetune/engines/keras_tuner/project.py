"""The keras-tuner project of a study, beside the study database: one searcher at a time."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import filelock

from autofinetune.errors import ConfigError


def keras_tuner_directory(storage_url: str) -> Path:
    """Where the keras-tuner projects of a study database live.

    ``x.db.keras_tuner/`` beside a SQLite database ``x.db``; for a server database,
    ``autofinetune-keras-tuner/`` in the working directory. Each study is a project folder in it.
    """
    from autofinetune.store.database import sqlite_path

    path = sqlite_path(storage_url)
    if path is not None:
        return path.with_name(path.name + ".keras_tuner")
    return Path("autofinetune-keras-tuner").resolve()


class Project:
    """The keras-tuner project of one study: locked while searched, and remembering its tuner.

    keras-tuner keeps its search state in files of the project folder, so one process searches a
    project at a time; a second ``launch`` is refused instead of corrupting it. The project's id
    (a UUID in ``autofinetune.json``) tags the trials mirrored from it, so a new project for the
    same study, whose trial ids start again at 0, never matches the old project's trials.
    """

    def __init__(self, directory: Path, name: str, tuner: str) -> None:
        self.directory = directory
        self.name = name
        self.path = directory / name
        self.path.mkdir(parents=True, exist_ok=True)
        # A lock of the operating system (filelock: fcntl or Windows' msvcrt), so a process
        # that dies releases it.
        self._lock = filelock.FileLock(self.path / "autofinetune.lock")
        try:
            self._lock.acquire(timeout=0)
        except filelock.Timeout:
            raise ConfigError(
                f"keras-tuner project {str(self.path)!r}: another `autofinetune launch --engine keras-tuner` "
                "is searching it; wait for it to finish (a keras-tuner project has one searcher at a time)"
            ) from None
        info_path = self.path / "autofinetune.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        if info.get("tuner", tuner) != tuner:
            self.close()
            raise ConfigError(
                f"--tuner: got {tuner!r}, but the keras-tuner project {str(self.path)!r} of study {name!r} "
                f"searches with {info['tuner']!r}; resume with --tuner {info['tuner']}, or start another study"
            )
        self.id = info.get("project_id") or uuid.uuid4().hex
        info_path.write_text(json.dumps({"study": name, "tuner": tuner, "project_id": self.id}, indent=2))

    def close(self) -> None:
        """Let another process search the project."""
        self._lock.release()
