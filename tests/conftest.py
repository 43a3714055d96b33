"""Shared fixtures: tiny specs that train in seconds, on synthetic images or small folders."""

from __future__ import annotations

import copy
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Ray runs its workers at niceness 15, so a trial actor starves while another test trains on the
# same cores (tests run two at a time) and its waits time out. Inherited by the Ray instances the
# tests start.
os.environ.setdefault("RAY_worker_niceness", "0")

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    # Started in the background (`pytest &` in a script), the tests inherit an ignored SIGINT and
    # so would every launch they start; the Ctrl-C tests need Python's own handler.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


TINY_SPEC: dict[str, Any] = {
    "name": "tiny",
    "seed": 0,
    "data": {
        "source": "synthetic",
        "image_size": 16,
        "validation_split": 0.25,
        "batch_size": 16,
        "synthetic_classes": 3,
        "synthetic_images_per_class": 16,
    },
    "backbone": {"name": "tiny_resnet", "weights": "none"},
    "schedule": {"phase1_epochs": 2, "phase2_epochs": 2, "phase1_optimizer": "rmsprop"},
    "search": {
        "n_trials": 4,
        "head_units": [8, 16],
        "unfreeze_depth": {"low": 0, "high": 16},
        "phase1_lr": {"low": 1e-3, "high": 1e-2, "log": True},
        "phase1_momentum": {"low": 0.0, "high": 0.9},
        "phase2_lr": {"low": 1e-4, "high": 1e-2, "log": True},
        "phase2_momentum": {"low": 0.5, "high": 0.95},
    },
}


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` into a copy of ``base`` (tables merge, values replace)."""
    result = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def tiny_spec_dict(**overrides: Any) -> dict[str, Any]:
    return merge(TINY_SPEC, overrides)


def to_toml(data: dict[str, Any]) -> str:
    """A minimal TOML writer for spec dicts (tables of scalars, lists and inline tables)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        return repr(v)

    lines = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for section, table in data.items():
        if isinstance(table, dict):
            lines.append(f"\n[{section}]")
            lines.extend(f"{k} = {value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


def write_spec(folder: Path, data: dict[str, Any], name: str = "study.toml") -> Path:
    path = Path(folder) / name
    path.write_text(to_toml(data), encoding="utf-8")
    return path


@pytest.fixture(scope="session", autouse=True)
def _feature_cache_in_a_temporary_folder(tmp_path_factory):
    """Trials cache frozen features by default; keep them out of the working directory."""
    from autofinetune.trial.features import CACHE_DIR_ENV

    before = os.environ.get(CACHE_DIR_ENV)
    os.environ[CACHE_DIR_ENV] = str(tmp_path_factory.mktemp("feature-cache"))
    yield
    if before is None:
        os.environ.pop(CACHE_DIR_ENV, None)
    else:
        os.environ[CACHE_DIR_ENV] = before


@pytest.fixture
def tiny_spec(tmp_path):
    """A factory of validated tiny specs: ``tiny_spec(schedule={"phase2_epochs": 1})``."""
    from autofinetune.spec import parse_spec

    def make(**overrides: Any):
        return parse_spec(tiny_spec_dict(**overrides), base_dir=tmp_path, origin="tiny.toml")

    return make


@pytest.fixture
def tiny_spec_file(tmp_path):
    """A factory of tiny spec files on disk; returns the path."""

    def make(name: str = "study.toml", **overrides: Any) -> Path:
        return write_spec(tmp_path, tiny_spec_dict(**overrides), name)

    return make


def _started_postgres(max_connections: int = 200):
    """A started PostgreSQL server; the test is skipped only outside CI when it is not installed."""
    from postgres import PostgresServer, postgres_available

    if not postgres_available():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed; .ci/run installs Debian's postgresql package")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    return PostgresServer(max_connections=max_connections).start()


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server for the session."""
    # Every test of an xdist worker shares it, and each study a test loads keeps its connection
    # pool until Python collects it: 173 connections were seen at once late in a local run.
    server = _started_postgres(max_connections=500)
    yield server
    server.stop()


@pytest.fixture
def own_postgres():
    """A real PostgreSQL server of one test's own, which it may stop and restart."""
    server = _started_postgres()
    yield server
    server.stop()


# --- one real study, launched once and shared by the dashboard, export and report tests ------

#: The study `launched_study` runs: three trials of two steps (one per phase); only the best keeps
#: its model, so the others exercise `export --retrain`. Learning rates and depths are narrowed
#: to values that learn within those two epochs, so the best model is well above chance and an
#: export that reproduces its accuracy says something.
LAUNCHED_SPEC: dict[str, Any] = tiny_spec_dict(
    name="shared",
    data={"batch_size": 8, "synthetic_images_per_class": 40},
    search={
        "n_trials": 3, "pruner": "none", "keep_checkpoints": 1,
        "unfreeze_depth": {"low": 6, "high": 16},
        "phase1_lr": {"low": 3e-3, "high": 1e-2, "log": True},
        "phase2_lr": {"low": 5e-4, "high": 2e-3, "log": True},
    },
    schedule={"phase1_epochs": 1, "phase2_epochs": 1},
)


def cli_env() -> dict[str, str]:
    """The environment for `python -m autofinetune.cli` subprocesses: this tree's package first."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, TF_CPP_MIN_LOG_LEVEL="2")


class LaunchedStudy:
    """Where the shared study lives: its folder, spec file, database URL and name."""

    def __init__(self, folder: Path, spec_path: Path) -> None:
        self.folder = folder
        self.spec_path = spec_path
        self.url = f"sqlite:///{folder / 'study.db'}"
        self.name = LAUNCHED_SPEC["name"]
        self.artifacts = folder / "study.db.artifacts"

    def load(self):
        import optuna

        return optuna.load_study(study_name=self.name, storage=self.url)


@pytest.fixture(scope="session")
def launched_study(tmp_path_factory) -> LaunchedStudy:
    """A study made by a real `autofinetune launch` (tiny backbone, synthetic images)."""
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("launched")
    spec_path = write_spec(folder, LAUNCHED_SPEC)
    study = LaunchedStudy(folder, spec_path)
    out = subprocess.run(
        [sys.executable, "-m", "autofinetune.cli", "launch", str(spec_path), "--storage", study.url],
        cwd=folder, env=cli_env(), capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return study


def wait_for(condition, timeout: float = 300, what: str = "condition", process=None):
    """Poll ``condition`` every 0.2 s until it returns something truthy, and return that.

    Args:
        process: A ``subprocess.Popen`` the condition depends on (a launch): once it has exited,
            waiting longer cannot help, so the wait fails at once with its exit code and the
            end of its output (where its stdout is a pipe nobody else reads).

    Raises:
        AssertionError: ``timeout`` seconds passed first, or ``process`` exited (the message
            names ``what``).
    """
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            output = process.stdout.read() if process.stdout is not None else ""
            raise AssertionError(f"waiting for {what}: the process exited with code {process.returncode}\n"
                                 f"{(output or '')[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")
