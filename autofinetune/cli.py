"""The ``autofinetune`` command line.

Exit codes: 0 success, 1 an unexpected error (for ``launch``: worker processes that kept
crashing), 2 bad input (nothing was written) or a fatal error, 75 the study database stayed
unreachable past ``search.outage_grace`` (launch again to resume), 130 Ctrl-C.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from autofinetune.engines.base import ENGINES
from autofinetune.errors import ConfigError, ExitCode, FatalError

# Named, not __name__: worker processes run this module as __main__.
logger = logging.getLogger("autofinetune.cli")


#: The group's options a user may also give after the command's name (``launch x.toml -q``).
_ANYWHERE_FLAGS = frozenset({"-q", "--quiet", "-v", "-vv", "-vvv", "--verbose"})
_ANYWHERE_WITH_VALUE = "--log-file"


def hoist_group_options(args: list[str]) -> list[str]:
    """``args`` with ``-q``, ``-v``, ``--verbose``, ``--quiet`` and ``--log-file FILE`` moved
    before the command's name wherever they were given (never after ``--``)."""
    moved: list[str] = []
    kept: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--":
            kept.extend(args[index:])
            break
        if arg in _ANYWHERE_FLAGS or arg.startswith(f"{_ANYWHERE_WITH_VALUE}="):
            moved.append(arg)
        elif arg == _ANYWHERE_WITH_VALUE and index + 1 < len(args):
            moved.extend(args[index : index + 2])
            index += 1
        else:
            kept.append(arg)
        index += 1
    return moved + kept


class _Group(click.Group):
    """Takes ``-q``/``-v``/``--log-file`` anywhere on the line, and turns autofinetune's errors
    into a one-line message and the documented exit code."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, hoist_group_options(list(args)))

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ConfigError as error:
            click.echo(f"error: {error}", err=True)
            ctx.exit(ExitCode.BAD_INPUT)
        except FatalError as error:
            click.echo(f"fatal: {error}", err=True)
            ctx.exit(ExitCode.BAD_INPUT)


@click.group(cls=_Group)
@click.version_option(package_name="autofinetune")
@click.option("-v", "--verbose", count=True,
              help="More log lines: -v info (and TensorFlow's native warnings), -vv debug. Worker processes follow.")
@click.option("-q", "--quiet", is_flag=True, help="Errors only: no progress bars, no trial lines, no summary.")
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Append log lines (info and up, whatever -q/-v) of this and every worker process to this file.")
def main(verbose: int, quiet: bool, log_file: Path | None) -> None:
    """Search the two-phase ResNet50 fine-tuning schedule into an Optuna study database.

    Without -q/-v the level comes from $AUTOFINETUNE_LOG_LEVEL (how worker processes receive it),
    else warnings; --log-file from $AUTOFINETUNE_LOG_FILE.
    """
    from autofinetune import logs

    try:
        logs.configure_logging(level=logs.level_from_flags(verbose=verbose, quiet=quiet), log_file=log_file)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    except OSError as error:
        raise ConfigError(f"--log-file: cannot append to {str(log_file)!r}: {error.strerror or error}") from None


def _say(line: str) -> None:
    """A line of progress for the terminal (stdout), left out with -q."""
    from autofinetune.logs import is_quiet

    if not is_quiet():
        click.echo(line)


def _skip_unreadable_option(function):
    return click.option(
        "--skip-unreadable", is_flag=True,
        help="Leave out image files that cannot be decoded, with one warning (as data.skip_unreadable = true).",
    )(function)


@main.command("run-trial")
@click.argument("spec_file", type=click.Path(path_type=Path))
@click.option(
    "--param", "params", multiple=True, metavar="NAME=VALUE",
    help="A trial parameter (repeatable); the rest take the seed recipe's values.",
)
@click.option("--checkpoint", type=click.Path(path_type=Path), help="Save the best epoch's model here (.keras).")
@click.option(
    "--cache-dir", type=click.Path(path_type=Path),
    help="Feature-cache folder (default: $AUTOFINETUNE_CACHE_DIR, the spec's cache.dir, ./autofinetune-cache).",
)
@click.option("--no-cache", is_flag=True, help="Recompute the frozen backbone every epoch (as cache.enabled = false).")
@_skip_unreadable_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def run_trial_command(
    spec_file: Path, params: tuple[str, ...], checkpoint: Path | None, cache_dir: Path | None, no_cache: bool,
    skip_unreadable: bool, as_json: bool,
) -> None:
    """Run one trial of SPEC_FILE's two-phase schedule and print its result."""
    from autofinetune.api import with_skip_unreadable
    from autofinetune.search.space import complete_params, parse_param_assignments
    from autofinetune.spec import load_spec

    spec = with_skip_unreadable(load_spec(spec_file), skip_unreadable)
    trial_params = complete_params(spec, parse_param_assignments(list(params)))
    if checkpoint is not None and checkpoint.suffix != ".keras":
        raise ConfigError(f"--checkpoint: got {str(checkpoint)!r}; the file name must end in .keras")

    from autofinetune.data.sources import load_data
    from autofinetune.viewing.report import format_trial_result
    from autofinetune.trial.schedule import run_trial

    from autofinetune.trial.features import FeatureCache

    from autofinetune.trial.devices import enable_memory_growth

    enable_memory_growth()
    feature_cache = False if no_cache else FeatureCache.from_spec(spec, directory=cache_dir)
    data = load_data(spec)
    result = run_trial(spec, trial_params, data, checkpoint_path=checkpoint, feature_cache=feature_cache)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(format_trial_result(result, data_source=data.source))
    if result.state == "failed":
        sys.exit(1)


def _storage_option(function):
    return click.option(
        "--storage", metavar="URL",
        help="SQLAlchemy URL of the study database "
             "[default: $AUTOFINETUNE_STORAGE, $OPTUNA_STORAGE, the spec's, or sqlite:///autofinetune.db].",
    )(function)


def _artifacts_option(function):
    return click.option(
        "--artifacts", metavar="DIR_OR_URL",
        help="Where trial checkpoints go [default: beside a SQLite database, else ./autofinetune-artifacts].",
    )(function)


def _click_option(name: str, form, *, default, engine: str | None):
    """A click option of an engine option's command-line form (:func:`autofinetune.engines.base.option`).

    Its default is ``None``: an option left out is not passed, and keeps the engine's default.
    """
    if form.choices:
        kind = click.Choice(list(form.choices))
    elif form.kind is int:
        kind = click.IntRange(min=form.minimum) if form.minimum is not None else click.INT
    elif form.kind is float:
        kind = click.FloatRange(min=form.minimum) if form.minimum is not None else click.FLOAT
    else:
        kind = click.STRING
    shown = "" if default is None or "[default" in form.help else f" [default: {default}]"
    prefix = f"[{engine}] " if engine else ""
    return click.option(form.flag, name, type=kind, default=None, metavar=form.metavar, help=f"{prefix}{form.help}{shown}")


def _engine_options(function):
    """Every registered engine's options as ``launch`` flags, made from its options dataclass;
    the options every engine shares (``--artifacts``) once, untagged."""
    import dataclasses

    from autofinetune.engines.base import EngineOptions, command_line_options, engine_class

    shared = {spec.name for spec in dataclasses.fields(EngineOptions)}
    seen: dict[str, str] = {}
    decorators = []
    for engine in ENGINES:
        options_type = engine_class(engine).options_type
        defaults = {spec.name: spec.default for spec in dataclasses.fields(options_type)}
        for name, form in command_line_options(options_type):
            if form.flag in seen:
                if seen[form.flag] != name:
                    raise RuntimeError(f"{form.flag} names two engine options ({seen[form.flag]}, {name})")
                continue
            seen[str(form.flag)] = name
            owner = None if name in shared else engine
            decorators.append(_click_option(name, form, default=defaults[name], engine=owner))
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


def _optuna_worker_options(function):
    """The Optuna engine's worker options (``--workers``, ``--gpus``, ``--trials-per-gpu``,
    ``--artifacts``), for ``autofinetune worker``."""
    import dataclasses

    from autofinetune.engines.optuna.engine import OptunaOptions
    from autofinetune.engines.base import command_line_options

    defaults = {spec.name: spec.default for spec in dataclasses.fields(OptunaOptions)}
    for name, form in reversed(list(command_line_options(OptunaOptions))):
        function = _click_option(name, form, default=defaults[name], engine=None)(function)
    return function


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.time() + timeout


@main.command()
@click.argument("spec_file", type=click.Path(path_type=Path))
@click.option("--study-name", metavar="NAME", help="The study's name [default: the spec's name]: one spec, several studies.")
@click.option("--n-trials", type=click.IntRange(min=1), help="The study's total trials (finished ones count).")
@click.option("--timeout", type=click.FloatRange(min=0), help="Start no new trial after this many seconds.")
@_storage_option
@_skip_unreadable_option
@click.option("--engine", type=click.Choice(list(ENGINES)), default="optuna", show_default=True,
              help="Who runs the trials; every engine writes into the same study database.")
@_engine_options
@click.option("--mlflow", metavar="URI", help="Log every trial to this MLflow tracking URI (as tracking.mlflow).")
@click.option("--mlflow-register", metavar="NAME",
              help="Register the best trial's model in MLflow's model registry as NAME (as tracking.mlflow_register).")
@click.option("--wandb", metavar="PROJECT", help="Log every trial to this Weights & Biases project (as tracking.wandb).")
@click.option("--tensorboard", metavar="DIR", help="Write every trial's TensorBoard events under DIR/STUDY-ID/trial_N (as tracking.tensorboard).")
def launch(spec_file: Path, study_name: str | None, n_trials: int | None, timeout: float | None, storage: str | None,
           skip_unreadable: bool, engine: str, mlflow: str | None, mlflow_register: str | None, wandb: str | None,
           tensorboard: str | None, **engine_options: Any) -> None:
    """Create or resume the study of SPEC_FILE and run its trials.

    The options tagged [optuna], [ray] or [keras-tuner] belong to that engine (--engine).
    """
    from autofinetune.api import run_launch

    study, code = run_launch(
        spec_file, n_trials=n_trials, timeout=timeout, storage=storage, engine=engine,
        skip_unreadable=skip_unreadable, mlflow=mlflow, wandb=wandb, tensorboard=tensorboard,
        mlflow_register=mlflow_register, study_name=study_name, announce=_say, warn=lambda line: click.echo(line, err=True),
        **engine_options,
    )
    if code == ExitCode.DATABASE_UNREACHABLE:
        click.echo("fatal: the study database stayed unreachable past search.outage_grace; finished trials are "
                   "kept: run the same launch again to resume once the database is back", err=True)
    else:
        _print_summary(study)
    sys.exit(int(code))


@main.command()
@click.argument("study_name")
@_storage_option
@_optuna_worker_options
@click.option("--timeout", type=click.FloatRange(min=0), help="Start no new trial after this many seconds.")
def worker(study_name: str, storage: str | None, workers: int | None, gpus: str | None, trials_per_gpu: int | None,
           timeout: float | None, artifacts: str | None) -> None:
    """Join a running study, e.g. from another machine sharing its PostgreSQL database."""
    from autofinetune.engines.devices import describe_slots
    from autofinetune.engines.optuna.supervisor import WorkerSupervisor, gpu_slots
    from autofinetune.store.database import load_study, open_storage, redact_url, resolve_storage_url
    from autofinetune.store.outages import DEFAULT_OUTAGE_GRACE, OutagePolicy
    from autofinetune.store.study import spec_from_study

    slots = gpu_slots(gpus, workers, trials_per_gpu=trials_per_gpu)
    url = resolve_storage_url(storage)
    # Refused at once when unreachable now; afterwards (the summary) an outage is waited out.
    outage = OutagePolicy(DEFAULT_OUTAGE_GRACE, where=redact_url(url))
    study = load_study(study_name, open_storage(url, create=False, outage=outage))
    outage.grace = spec_from_study(study).search.outage_grace
    click.echo(describe_slots(slots))
    supervisor = WorkerSupervisor(
        study_name, url, slots=slots, deadline=_deadline(timeout), artifacts=artifacts, outage_grace=outage.grace
    )
    code = supervisor.run()
    if code != ExitCode.DATABASE_UNREACHABLE:
        _print_summary(study)
    sys.exit(code)


@main.command("worker-process", hidden=True)
@click.argument("study_name")
@click.option("--worker-index", type=int, default=0)
@click.option("--deadline", type=float)
@click.option("--progress", is_flag=True)
@click.option("--wait-for-go", is_flag=True, help="Import the libraries, then wait for a 'go' line on stdin.")
@_storage_option
def worker_process(study_name: str, worker_index: int, deadline: float | None, progress: bool, wait_for_go: bool,
                   storage: str | None) -> None:
    """Run trials in this process (started by `launch` and `worker`)."""
    if wait_for_go and not _imported_and_told_to_go():
        sys.exit(0)  # the launch was refused, or stopped, before the study was ready
    from autofinetune.engines.optuna.worker import run_worker
    from autofinetune.store.database import resolve_storage_url

    logger.info("worker %d of study %r started (pid %d)", worker_index, study_name, os.getpid())
    code = run_worker(study_name, resolve_storage_url(storage), worker_index=worker_index, deadline=deadline,
                      progress=progress)
    logger.info("worker %d of study %r exits with code %d", worker_index, study_name, code)
    sys.exit(code)


def _imported_and_told_to_go() -> bool:
    """A pre-started worker: import what trials need (TensorFlow: seconds), then wait for the
    supervisor's go (see ``WorkerSupervisor.prestart``). ``False``: told nothing, or Ctrl-C."""
    from autofinetune.engines.optuna.supervisor import GO

    try:
        import autofinetune.engines.optuna.worker  # noqa: F401
        import autofinetune.trial.schedule  # noqa: F401
        from autofinetune.trial.devices import enable_memory_growth

        enable_memory_growth()  # imports Keras and its backend; before anything touches a GPU
        return sys.stdin.readline().strip() == GO
    except KeyboardInterrupt:
        return False


@main.command()
@click.argument("study_name", required=False)
@_storage_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document: the study, every trial, the best one.")
def status(study_name: str | None, storage: str | None, as_json: bool) -> None:
    """A table of the trials of STUDY_NAME (or of the database's only study) and the best one."""
    from autofinetune.viewing.report import format_study_status, study_status_document
    from autofinetune.store.database import load_study, open_storage, resolve_storage_url

    url = resolve_storage_url(storage)
    backend = open_storage(url, create=False)
    study = load_study(study_name or _only_study(backend), backend)
    if as_json:
        click.echo(json.dumps(study_status_document(study), indent=2, allow_nan=False))
    else:
        click.echo(format_study_status(study))


@main.command()
@_storage_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document listing the studies.")
def studies(storage: str | None, as_json: bool) -> None:
    """List the studies in the study database."""
    from autofinetune.viewing.report import format_studies, studies_document
    from autofinetune.store.database import open_storage, resolve_storage_url

    backend = open_storage(resolve_storage_url(storage), create=False)
    if as_json:
        click.echo(json.dumps(studies_document(backend), indent=2, allow_nan=False))
    else:
        click.echo(format_studies(backend))


def _only_study(storage) -> str:
    import optuna

    names = optuna.get_all_study_names(storage)
    if len(names) != 1:
        raise ConfigError(f"name the study; this database holds {len(names)}: {', '.join(sorted(names)) or 'none'}")
    return names[0]


def _print_summary(study) -> None:
    """The study's best trial, or one line on why it cannot be read now."""
    from autofinetune.store.outages import StorageUnavailableError
    from autofinetune.viewing.report import format_best_trial

    try:
        _say(format_best_trial(study))
    except StorageUnavailableError as error:
        click.echo(f"warning: no summary: {error}", err=True)


@main.command("make-digits-folder")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--image-size", type=click.IntRange(8, 1024), default=32, show_default=True)
def make_digits_folder(folder: Path, image_size: int) -> None:
    """Write scikit-learn's handwritten digits as an image folder (one sub-folder per class)."""
    from autofinetune.data.sources import digits_images, write_image_folder

    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(f"folder {str(folder)!r} is not empty; choose a new or empty folder")
    x, y, names = digits_images(image_size)
    write_image_folder(folder, x, y, names)
    click.echo(f"wrote {len(x)} images in {len(names)} classes to {folder}")


# --- view, export, predict, report ---------------------------------------------------------


def _study_for(name: str | None, storage: str | None):
    """``(study, url)`` of STUDY_NAME (or the database's only study)."""
    from autofinetune.store.database import load_study, open_storage, resolve_storage_url

    url = resolve_storage_url(storage)
    backend = open_storage(url, create=False)
    return load_study(name or _only_study(backend), backend), url


@main.command()
@click.argument("study_or_spec", required=False)
@_storage_option
@click.option("--host", help="Address to listen on [default: the config's, else 127.0.0.1: this machine only].")
@click.option("--port", type=click.IntRange(0, 65535), help="Port [default: the config's, else 8080]; 0 picks a free one.")
@_artifacts_option
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="An optuna-dashboard TOML config [default: dashboards/optuna-dashboard.toml].")
def dashboard(study_or_spec: str | None, storage: str | None, host: str | None, port: int | None,
              artifacts: str | None, config_file: Path | None) -> None:
    """Serve optuna-dashboard on the study database, with trial checkpoints as artifacts.

    STUDY_OR_SPEC is a study name or its spec file (whose storage is then used); without it the
    page lists every study. Writes the notes that finished trials lack, prints the URL and
    serves until Ctrl-C.
    """
    from dataclasses import replace

    from autofinetune.viewing.dashboard import default_config_path, load_dashboard_config, serve_dashboard
    from autofinetune.store.database import resolve_storage_url

    settings = load_dashboard_config(config_file or default_config_path())
    settings = replace(settings, host=host or settings.host, port=settings.port if port is None else port)
    spec = None
    study_name = study_or_spec
    if study_or_spec is not None and (study_or_spec.endswith(".toml") or Path(study_or_spec).is_file()):
        from autofinetune.spec import load_spec

        spec = load_spec(study_or_spec)
        study_name = spec.name
    url = resolve_storage_url(storage or settings.storage, spec)
    serve_dashboard(url, study_name=study_name, settings=settings, artifacts=artifacts,
                    announce=lambda line: click.echo(line))


@main.command()
@click.argument("study_name")
@click.option("--trial", "trial_number", type=click.IntRange(min=0), help="Trial number [default: the best trial].")
@_storage_option
@_artifacts_option
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Folder to write (new or empty).")
@click.option("--format", "fmt_name", type=click.Choice(["keras", "savedmodel", "tflite", "onnx"]), default="keras",
              show_default=True, help="Model format (onnx needs the onnx extra).")
@click.option("--retrain", is_flag=True, help="Train the trial's params again when its checkpoint was not kept.")
@click.option("--train-on-all", is_flag=True, help="With --retrain: train on training and validation images.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier export in --out.")
def export(study_name: str, trial_number: int | None, storage: str | None, artifacts: str | None, out_dir: Path,
           fmt_name: str, retrain: bool, train_on_all: bool, overwrite: bool) -> None:
    """Export a trial's model (raw pixels in, probabilities out) with a model card."""
    from autofinetune.export.exporter import export_trial
    from autofinetune.viewing.notes import fmt
    from autofinetune.store.database import artifacts_location, open_artifact_store

    study, url = _study_for(study_name, storage)
    location = artifacts_location(url, artifacts)
    store = open_artifact_store(location) if location.startswith(("s3://", "gs://")) or Path(location).is_dir() else None
    result = export_trial(
        study, out_dir=out_dir, storage_url=url, trial_number=trial_number, fmt_name=fmt_name, retrain=retrain,
        train_on_all=train_on_all, overwrite=overwrite, artifact_store=store, log=lambda line: click.echo(line),
    )
    card = result.card
    click.echo(
        f"exported trial {card['trial']['number']} of study {study.study_name!r} "
        f"({card['metrics']['objective']} {fmt(card['metrics']['value'])}) to {result.model_path}"
    )
    click.echo(f"model card: {result.out_dir / 'MODEL_CARD.md'}")


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True)
@click.option("--top-k", type=click.IntRange(min=1), default=3, show_default=True, help="Classes per image.")
@click.option("--json", "as_json", is_flag=True, help="Print the predictions as JSON.")
def predict(model_dir: Path, images: tuple[str, ...], top_k: int, as_json: bool) -> None:
    """Classify IMAGES (files or folders) with a model written by `export`.

    An image that cannot be read is named in an error line and the rest go on; the exit code
    is then 1.
    """
    from autofinetune.export.predict import format_prediction, load_exported_model, predict_images

    model = load_exported_model(model_dir)
    run = predict_images(model, images, top_k=top_k,
                         on_error=lambda name, reason: click.echo(f"error: {name}: {reason}", err=True))
    if as_json:
        click.echo(json.dumps({
            "predictions": [p.to_dict() for p in run.predictions],
            "errors": [{"file": name, "error": reason} for name, reason in run.errors],
        }, indent=2))
    else:
        for prediction in run.predictions:
            click.echo(format_prediction(prediction))
    if run.errors:
        sys.exit(1)


@main.command()
@click.argument("study_name", required=False)
@_storage_option
@click.option("--out", type=click.Path(path_type=Path), default=Path("report.html"), show_default=True,
              help="The HTML file to write.")
def report(study_name: str | None, storage: str | None, out: Path) -> None:
    """Write STUDY_NAME as one static HTML page (plots and trials) to share without a server."""
    from autofinetune.viewing.html_report import write_report

    study, _ = _study_for(study_name, storage)
    path = write_report(study, out)
    click.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB; opens offline in a browser)")


if __name__ == "__main__":  # pragma: no cover
    main()
