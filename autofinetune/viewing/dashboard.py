"""optuna-dashboard on a study database: the server, its configuration, and missing notes.

The optional ``optuna_dashboard`` package is imported inside functions only; a command that
needs it says which extra to install. The notes and curves themselves are written by
:mod:`autofinetune.viewing.trial_views` (as trials end); this module writes those a study lacks.

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
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any, Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from autofinetune.errors import ConfigError
from autofinetune.store.attributes import STUDY_SPEC_ATTR
from autofinetune.viewing.notes import COMPLETE, FAIL, PRUNED
from autofinetune.store.optuna_internals import study_id as study_id_of
from autofinetune.store.optuna_internals import study_system_attrs, trial_id
from autofinetune.viewing.trial_views import TRIAL_NOTE_VERSION_KEY, TrialRef, write_study_note, write_trial_views

logger = logging.getLogger(__name__)

DASHBOARD_EXTRA = "pip install 'autofinetune[dashboard]'"
DEFAULT_CONFIG_NAME = "optuna-dashboard.toml"


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


def read_trial_note(study, trial_id: int) -> str:
    """A trial's dashboard note ("" when it has none).

    Raises:
        ConfigError: optuna-dashboard is not installed.
    """
    return require_optuna_dashboard().get_note(TrialRef(study, trial_id))


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
    system_attrs = study_system_attrs(study)
    states = {TrialState.COMPLETE: COMPLETE, TrialState.PRUNED: PRUNED, TrialState.FAIL: FAIL}
    written = 0
    for trial in study.get_trials(deepcopy=False):
        if trial.state not in states or TRIAL_NOTE_VERSION_KEY.format(trial_id=trial_id(trial)) in system_attrs:
            continue
        write_trial_views(study, trial_id(trial), state=states[trial.state], value=trial.values[0] if trial.values else None,
                          attrs=trial.user_attrs)
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
        if key == "port" and isinstance(value, int) and not 0 <= value <= 65535:
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
    from autofinetune.store.artifacts import artifacts_location, open_artifact_store
    from autofinetune.store.database import load_study, open_storage

    import optuna

    storage = open_storage(storage_url, create=False)
    study_id = None
    if study_name is not None:
        study_id = study_id_of(load_study(study_name, storage))
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
