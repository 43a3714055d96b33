"""optuna-dashboard on a study database: notes and learning curves for our trials, and the server.

The optional ``optuna_dashboard`` package is imported here only, inside functions: a worker
without it still runs trials (their notes are then written when ``autofinetune dashboard``
starts), and a command that needs it says which extra to install.

What our studies show beyond Optuna's defaults:

* a study note with the spec (written when the study is created);
* for every finished trial a note (phases, unfrozen blocks, best of each phase, images/s, why it
  was pruned or failed) and the artifact ``learning_curve.svg`` (both phases, boundary marked);
* the best trials' checkpoints as downloadable artifacts (uploaded by ``CheckpointKeeper``).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
import tempfile
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any, Callable, Mapping
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from autofinetune.errors import ConfigError
from autofinetune.store.notes import COMPLETE, FAIL, PRUNED, learning_curve_svg, study_note, trial_note
from autofinetune.store.database import STUDY_SPEC_ATTR

logger = logging.getLogger(__name__)

DASHBOARD_EXTRA = "pip install 'autofinetune[dashboard]'"
LEARNING_CURVE_FILE = "learning_curve.svg"
DEFAULT_CONFIG_NAME = "optuna-dashboard.toml"

# optuna-dashboard keeps a note's version in this study system attribute (see its _note.py);
# reading the study's attributes once tells which trials have a note without a query per trial.
_TRIAL_NOTE_VERSION_KEY = "dashboard:{trial_id}:note_ver"
_STUDY_NOTE_VERSION_KEY = "dashboard:note_ver"


def require_optuna_dashboard():
    """The ``optuna_dashboard`` module.

    Raises:
        ConfigError: it is not installed; the message names the extra that brings it.
    """
    try:
        import optuna_dashboard
    except ImportError as error:
        raise ConfigError(f"optuna-dashboard is not installed ({error}); install it with: {DASHBOARD_EXTRA}") from None
    return optuna_dashboard


def _dashboard_or_none():
    try:
        import optuna_dashboard
    except ImportError:
        return None
    return optuna_dashboard


class _TrialRef:
    """The parts of an ``optuna.Trial`` that ``optuna_dashboard.save_note`` reads.

    ``optuna.Trial(study, trial_id)`` would also run the sampler's ``before_trial`` hook, which
    must not happen again for a trial that is already running or finished.
    """

    def __init__(self, study, trial_id: int) -> None:
        self.study = study
        self.storage = study._storage
        self._trial_id = trial_id


# --- writing notes and curves -----------------------------------------------------------------


def _study_system_attrs(study) -> dict[str, Any]:
    # Study.system_attrs is gone from Optuna 5's public API; the storage still has them.
    return study._storage.get_study_system_attrs(study._study_id)


def _stored_spec(study) -> Mapping[str, Any]:
    stored = study.user_attrs.get(STUDY_SPEC_ATTR) or {}
    return stored.get("spec", {}) if isinstance(stored, Mapping) else {}


def write_study_note(study, *, spec_data: Mapping[str, Any] | None = None) -> bool:
    """Write the study note unless the study has one (a person may have edited it).

    Never raises: a dashboard note is worth less than the search it describes.

    Args:
        study: The study.
        spec_data: The stored spec; read from the study when left out.

    Returns:
        Whether a note was written.
    """
    dashboard = _dashboard_or_none()
    if dashboard is None:
        return False
    try:
        if _STUDY_NOTE_VERSION_KEY in _study_system_attrs(study):
            return False
        spec_data = spec_data if spec_data is not None else _stored_spec(study)
        if not spec_data:
            return False
        dashboard.save_note(study, study_note(spec_data, direction=study.direction.name.lower()))
        return True
    except Exception as error:
        logger.warning("could not write the dashboard note of study %r: %s", study.study_name, error)
        return False


def write_trial_views(
    study,
    trial_id: int,
    *,
    state: str,
    value: float | None = None,
    attrs: Mapping[str, Any] | None = None,
    artifact_store=None,
) -> None:
    """Write a finished trial's dashboard note and upload its learning curve.

    Called by the engines (through ``autofinetune.store.recorder``) once a trial's outcome is
    known, while the trial is still RUNNING (artifacts can be attached only then; a note can be
    written at any time). Never raises: a failure is logged and the trial goes on.

    Args:
        study: The study holding the trial.
        trial_id: The storage's id of the trial.
        state: The outcome: ``"COMPLETE"``, ``"PRUNED"`` or ``"FAIL"``.
        value: The objective value, for a complete trial.
        attrs: The trial's user attributes (read from the storage when left out).
        artifact_store: Where to upload ``learning_curve.svg``; ``None`` uploads nothing.
    """
    try:
        frozen = study._storage.get_trial(trial_id)
        attrs = {**frozen.user_attrs, **(attrs or {})}
        spec_data = _stored_spec(study)
        objective = spec_data.get("objective", {}).get("metric", "val_accuracy")
    except Exception as error:
        logger.warning("could not read trial %d for its dashboard note: %s", trial_id, error)
        return
    curve_id = None
    if artifact_store is not None and attrs.get("history"):
        curve_id = upload_learning_curve(study, frozen, attrs, objective=objective, artifact_store=artifact_store)
    curve_id = curve_id or find_learning_curve(frozen)
    dashboard = _dashboard_or_none()
    if dashboard is None:
        return
    try:
        body = trial_note(
            number=frozen.number,
            state=state,
            value=value,
            params=frozen.params,
            attrs=attrs,
            objective=objective,
            pruner=spec_data.get("search", {}).get("pruner"),
            retried_from=frozen.system_attrs.get("failed_trial"),
            # optuna-dashboard serves a trial's artifacts here; the note shows the plot inline.
            curve_url=f"/artifacts/{study._study_id}/{trial_id}/{curve_id}" if curve_id else None,
        )
        dashboard.save_note(_TrialRef(study, trial_id), body)
    except Exception as error:
        logger.warning("could not write the dashboard note of trial %d: %s", frozen.number, error)


def find_learning_curve(frozen) -> str | None:
    """The artifact id of the trial's ``learning_curve.svg``, if it has one."""
    import json

    for key, value in frozen.system_attrs.items():
        if not key.startswith("artifacts:"):
            continue
        try:
            meta = json.loads(value) if isinstance(value, str) else value
        except ValueError:
            continue
        if isinstance(meta, Mapping) and meta.get("filename") == LEARNING_CURVE_FILE:
            return str(meta.get("artifact_id") or key.split(":", 1)[1])
    return None


def upload_learning_curve(study, frozen, attrs: Mapping[str, Any], *, objective: str, artifact_store) -> str | None:
    """Upload ``learning_curve.svg`` for a RUNNING trial.

    Returns:
        The artifact id, or ``None`` (logged) when it could not be uploaded.
    """
    from optuna.artifacts import upload_artifact

    try:
        svg = learning_curve_svg(
            attrs.get("history") or [],
            objective=objective,
            boundary_step=attrs.get("phase_boundary_step"),
            title=f"trial {frozen.number}: {objective} per step",
            best_step=attrs.get("best_step"),
            pruned_at_step=attrs.get("pruned_at_step"),
        )
        with tempfile.TemporaryDirectory(prefix="autofinetune-curve-") as folder:
            path = Path(folder) / LEARNING_CURVE_FILE
            path.write_text(svg, encoding="utf-8")
            return upload_artifact(
                artifact_store=artifact_store,
                file_path=str(path),
                study_or_trial=frozen,
                storage=study._storage,
                mimetype="image/svg+xml",
            )
    except Exception as error:
        logger.warning("could not upload the learning curve of trial %d: %s", frozen.number, error)
        return None


def read_trial_note(study, trial_id: int) -> str:
    """A trial's dashboard note ("" when it has none).

    Raises:
        ConfigError: optuna-dashboard is not installed.
    """
    return require_optuna_dashboard().get_note(_TrialRef(study, trial_id))


def backfill_notes(study) -> int:
    """Write the notes a study lacks: its own and those of finished trials.

    Workers without optuna-dashboard installed, or older versions, leave trials without notes;
    ``autofinetune dashboard`` calls this before serving. Existing notes are never replaced.

    Returns:
        How many trial notes were written.
    """
    from optuna.trial import TrialState

    require_optuna_dashboard()
    write_study_note(study)
    system_attrs = _study_system_attrs(study)
    states = {TrialState.COMPLETE: COMPLETE, TrialState.PRUNED: PRUNED, TrialState.FAIL: FAIL}
    written = 0
    for trial in study.get_trials(deepcopy=False):
        if trial.state not in states or _TRIAL_NOTE_VERSION_KEY.format(trial_id=trial._trial_id) in system_attrs:
            continue
        write_trial_views(study, trial._trial_id, state=states[trial.state], value=trial.value, attrs=trial.user_attrs)
        written += 1
    return written


# --- the server's configuration ----------------------------------------------------------------


@dataclass(frozen=True)
class DashboardSettings:
    """How ``autofinetune dashboard`` serves; read from an optuna-dashboard TOML config file.

    Attributes:
        host: The address to listen on; loopback unless told otherwise.
        port: The port; 0 picks a free one (the printed URL names it).
        quiet: Leave out the log line of every HTTP request.
        storage: A study database URL (acts like ``--storage``).
        artifact_dir: The artifact store (acts like ``--artifacts``).
        source: The config file these came from, if any.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    quiet: bool = True
    storage: str | None = None
    artifact_dir: str | None = None
    source: str | None = None


_KEY_TYPES: dict[str, tuple[type, ...]] = {
    "host": (str,),
    "port": (int,),
    "quiet": (bool,),
    "storage": (str,),
    "artifact_dir": (str,),
    "server": (str,),
    "storage_class": (str,),
    "allow_unsafe": (bool,),
}


def default_config_path() -> Path | None:
    """``dashboards/optuna-dashboard.toml`` of this source tree, when there is one."""
    candidate = Path(__file__).resolve().parents[2] / "dashboards" / DEFAULT_CONFIG_NAME
    return candidate if candidate.is_file() else None


def load_dashboard_config(path: str | Path | None) -> DashboardSettings:
    """Read the ``[optuna_dashboard]`` table of an optuna-dashboard config file.

    The file format is optuna-dashboard's own (``optuna-dashboard --from-config FILE`` reads
    the same file). Settings this command cannot honour are refused rather than ignored.

    Args:
        path: The TOML file; ``None`` gives the built-in defaults.

    Raises:
        ConfigError: unreadable TOML, an unknown key, a value of the wrong type, or a setting
            only the ``optuna-dashboard`` command supports.
    """
    if path is None:
        return DashboardSettings()
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--config: {str(path)!r} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"{path}: not a readable TOML file ({error})") from None
    if "artifact_store" in data:
        raise ConfigError(
            f"{path}: [artifact_store]: not supported by `autofinetune dashboard`; set "
            "optuna_dashboard.artifact_dir, or pass --artifacts DIR_OR_URL (s3:// and gs:// work there)"
        )
    table = data.get("optuna_dashboard", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: optuna_dashboard: expected a table, got {table!r}")
    settings: dict[str, Any] = {}
    for key, value in table.items():
        where = f"{path}: optuna_dashboard.{key}"
        if key not in _KEY_TYPES:
            raise ConfigError(f"{where}: unknown key; allowed: {', '.join(_KEY_TYPES)}")
        if not isinstance(value, _KEY_TYPES[key]) or (key == "port" and isinstance(value, bool)):
            kind = " or ".join(t.__name__ for t in _KEY_TYPES[key])
            raise ConfigError(f"{where}: got {value!r}; expected a {kind}")
        if key == "port" and not 0 <= value <= 65535:
            raise ConfigError(f"{where}: got {value}; allowed: 0..65535 (0 picks a free port)")
        if key == "server" and value not in ("auto", "wsgiref"):
            raise ConfigError(
                f"{where}: got {value!r}; allowed here: \"auto\", \"wsgiref\" (for gunicorn run "
                f"`optuna-dashboard --from-config {path}` instead)"
            )
        if key == "storage_class":
            raise ConfigError(f"{where}: got {value!r}; `autofinetune dashboard` opens SQLAlchemy URLs only")
        if key == "allow_unsafe" and value:
            raise ConfigError(f"{where}: got true; allowed: false (our notes need no raw HTML)")
        if key in ("host", "port", "quiet", "storage", "artifact_dir"):
            settings[key] = value
    return replace(DashboardSettings(**settings), source=str(path))


# --- the server ----------------------------------------------------------------------------------


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    # The page fetches several API routes at once; one thread each. Daemon threads let Ctrl-C stop.
    daemon_threads = True


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        return None


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def dashboard_url(host: str, port: int, study_id: int | None = None) -> str:
    """The page to open: a study's, or the list of studies."""
    shown = f"[{host}]" if ":" in host else host
    path = f"/dashboard/studies/{study_id}" if study_id is not None else "/dashboard"
    return f"http://{shown}:{port}{path}"


def serve_dashboard(
    storage_url: str,
    *,
    study_name: str | None,
    settings: DashboardSettings,
    artifacts: str | None = None,
    announce: Callable[[str], None] = print,
) -> None:
    """Serve optuna-dashboard on a study database with its artifact store, until Ctrl-C.

    Args:
        storage_url: The study database's SQLAlchemy URL.
        study_name: The study whose page is announced; ``None`` announces the list of studies.
        settings: Host, port and quietness.
        artifacts: The artifact store's folder or URL (see ``storage.artifacts_location``).
        announce: Prints a line for the user (the URL, warnings).

    Raises:
        ConfigError: optuna-dashboard is missing, the study does not exist, or the port
            cannot be bound.
    """
    dashboard = require_optuna_dashboard()
    from autofinetune.store.database import artifacts_location, load_study, open_artifact_store, open_storage

    import optuna

    storage = open_storage(storage_url, create=False)
    study_id = None
    if study_name is not None:
        study_id = load_study(study_name, storage)._study_id
    for summary in storage.get_all_studies():
        if STUDY_SPEC_ATTR not in summary.user_attrs:
            continue  # not an autofinetune study: nothing to add to it
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        try:
            written = backfill_notes(study)
            if written:
                announce(f"wrote the dashboard notes of {written} trial(s) of study {study.study_name!r}")
        except Exception as error:  # e.g. a read-only database: serve what is there
            announce(f"warning: could not write missing notes of study {study.study_name!r}: {error}")

    location = artifacts_location(storage_url, artifacts or settings.artifact_dir)
    store = open_artifact_store(location)
    app = dashboard.wsgi(storage, artifact_store=store)
    server_class = _ThreadingServer6 if ":" in settings.host else _ThreadingServer
    handler = _QuietHandler if settings.quiet else WSGIRequestHandler
    try:
        server = make_server(settings.host, settings.port, app, server_class=server_class, handler_class=handler)
    except OSError as error:
        raise ConfigError(
            f"--port/--host: cannot listen on {settings.host}:{settings.port} ({error.strerror or error}); "
            "choose another port (0 picks a free one) or host"
        ) from None
    port = server.server_port
    if not is_loopback(settings.host):
        announce(
            f"warning: listening on {settings.host}, not loopback: anyone who can reach this port can read, "
            "edit and delete these studies (optuna-dashboard has no login)"
        )
    announce(f"artifacts: {location}")
    announce(f"optuna-dashboard: {dashboard_url(settings.host, port, study_id)}  (Ctrl-C stops it)")
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        announce("dashboard stopped")
    finally:
        server.server_close()
