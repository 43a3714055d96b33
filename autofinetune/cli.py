"""The ``autofinetune`` command line.

Exit codes: 0 success, 1 an unexpected error, 2 bad input (nothing was written), 130 Ctrl-C.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from autofinetune.engines.base import ENGINES
from autofinetune.errors import ConfigError, ExitCode, FatalError


def _quiet_frameworks() -> None:
    # TensorFlow's C++ start-up chatter hides the output users came for.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "2")


class _Group(click.Group):
    """Turns autofinetune's errors into a one-line message and the documented exit code."""

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
def main() -> None:
    """Search the two-phase ResNet50 fine-tuning schedule into an Optuna study database."""
    _quiet_frameworks()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


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
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def run_trial_command(
    spec_file: Path, params: tuple[str, ...], checkpoint: Path | None, cache_dir: Path | None, no_cache: bool,
    as_json: bool,
) -> None:
    """Run one trial of SPEC_FILE's two-phase schedule and print its result."""
    from autofinetune.spec.schema import load_spec
    from autofinetune.search.space import complete_params, parse_param_assignments

    spec = load_spec(spec_file)
    trial_params = complete_params(spec, parse_param_assignments(list(params)))
    if checkpoint is not None and checkpoint.suffix != ".keras":
        raise ConfigError(f"--checkpoint: got {str(checkpoint)!r}; the file name must end in .keras")

    from autofinetune.data.sources import load_data
    from autofinetune.viewing.report import format_trial_result
    from autofinetune.trial.schedule import run_trial

    from autofinetune.trial.features import FeatureCache

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
        help="SQLAlchemy URL of the study database [default: $AUTOFINETUNE_STORAGE, the spec's, or sqlite:///autofinetune.db].",
    )(function)


def _artifacts_option(function):
    return click.option(
        "--artifacts", metavar="DIR_OR_URL",
        help="Where trial checkpoints go [default: beside a SQLite database, else ./autofinetune-artifacts].",
    )(function)


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.time() + timeout


@main.command()
@click.argument("spec_file", type=click.Path(path_type=Path))
@click.option("--n-trials", type=click.IntRange(min=1), help="The study's total trials (finished ones count).")
@click.option("--timeout", type=click.FloatRange(min=0), help="Start no new trial after this many seconds.")
@_storage_option
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Local worker processes.")
@_artifacts_option
@click.option("--engine", type=click.Choice(list(ENGINES)), default="optuna", show_default=True,
              help="Who runs the trials; every engine writes into the same study database.")
@click.option("--address", help="[ray] Cluster address: auto, or ray://HOST:PORT [default: start a local instance].")
@click.option("--gpus-per-trial", type=click.FloatRange(min=0), default=0, show_default=True, help="[ray] GPUs per trial (fractions share a GPU).")
@click.option("--cpus-per-trial", type=click.FloatRange(min=0), default=1, show_default=True, help="[ray] CPUs per trial.")
@click.option("--max-concurrent", type=click.IntRange(min=1), help="[ray] Trials running at once.")
@click.option("--ray-storage", metavar="DIR_OR_URI",
              help="[ray] Ray's experiment state, for resuming [default: beside a SQLite database, else ~/ray_results].")
@click.option("--tuner", type=click.Choice(["hyperband", "bayesian", "random"]), default="hyperband", show_default=True,
              help="[keras-tuner] Which keras-tuner tuner searches.")
def launch(spec_file: Path, n_trials: int | None, timeout: float | None, storage: str | None, workers: int,
           artifacts: str | None, engine: str, address: str | None, gpus_per_trial: float, cpus_per_trial: float,
           max_concurrent: int | None, ray_storage: str | None, tuner: str) -> None:
    """Create or resume the study of SPEC_FILE and run its trials."""
    from autofinetune.engines.base import get_engine
    from autofinetune.search.algorithms import make_pruner, make_sampler
    from autofinetune.spec.schema import load_spec
    from autofinetune.store.database import open_storage, redact_url, resolve_storage_url
    from autofinetune.store.study import budget_used, create_or_resume_study, study_budget

    spec = load_spec(spec_file)
    # Build them once here so bad options fail before the database is touched.
    make_sampler(spec, seed=spec.seed)
    make_pruner(spec)
    chosen = get_engine(engine)
    options = chosen.make_options(
        deadline=_deadline(timeout), artifacts=artifacts, workers=workers, address=address,
        gpus_per_trial=gpus_per_trial, cpus_per_trial=cpus_per_trial, max_concurrent=max_concurrent,
        storage_path=ray_storage, tuner=tuner,
    )
    chosen.check(spec, options)
    url = resolve_storage_url(storage, spec)
    study, created = create_or_resume_study(spec, open_storage(url), n_trials=n_trials)
    counted, waiting = budget_used(study)
    verb = "created" if created else "resuming"
    click.echo(f"{verb} study {spec.name!r} in {redact_url(url)}: {counted - waiting} of {study_budget(study)} trials so far")
    code = chosen.launch(spec, url, study, options)
    _print_summary(study)
    sys.exit(int(code))


@main.command()
@click.argument("study_name")
@_storage_option
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Worker processes (without --gpus).")
@click.option("--gpus", metavar="0,1,...", help="Run one worker per GPU, each seeing only its device.")
@click.option("--timeout", type=click.FloatRange(min=0), help="Start no new trial after this many seconds.")
@_artifacts_option
def worker(study_name: str, storage: str | None, workers: int, gpus: str | None, timeout: float | None,
           artifacts: str | None) -> None:
    """Join a running study, e.g. from another machine sharing its PostgreSQL database."""
    from autofinetune.engines.optuna.supervisor import WorkerSupervisor, gpu_slots
    from autofinetune.store.database import load_study, open_storage, resolve_storage_url

    url = resolve_storage_url(storage)
    study = load_study(study_name, open_storage(url, create=False))
    try:
        slots = gpu_slots(gpus, workers)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    supervisor = WorkerSupervisor(study_name, url, slots=slots, deadline=_deadline(timeout), artifacts=artifacts)
    code = supervisor.run()
    _print_summary(study)
    sys.exit(code)


@main.command("worker-process", hidden=True)
@click.argument("study_name")
@click.option("--worker-index", type=int, default=0)
@click.option("--deadline", type=float)
@click.option("--progress", is_flag=True)
@_storage_option
def worker_process(study_name: str, worker_index: int, deadline: float | None, progress: bool, storage: str | None) -> None:
    """Run trials in this process (started by `launch` and `worker`)."""
    from autofinetune.engines.optuna.worker import run_worker
    from autofinetune.store.database import resolve_storage_url

    sys.exit(run_worker(study_name, resolve_storage_url(storage), worker_index=worker_index, deadline=deadline,
                        progress=progress))


@main.command()
@click.argument("study_name", required=False)
@_storage_option
def status(study_name: str | None, storage: str | None) -> None:
    """A table of the trials of STUDY_NAME (or of the database's only study) and the best one."""
    from autofinetune.viewing.report import format_study_status
    from autofinetune.store.database import load_study, open_storage, resolve_storage_url

    url = resolve_storage_url(storage)
    backend = open_storage(url, create=False)
    study = load_study(study_name or _only_study(backend), backend)
    click.echo(format_study_status(study))


@main.command()
@_storage_option
def studies(storage: str | None) -> None:
    """List the studies in the study database."""
    from autofinetune.viewing.report import format_studies
    from autofinetune.store.database import open_storage, resolve_storage_url

    click.echo(format_studies(open_storage(resolve_storage_url(storage), create=False)))


def _only_study(storage) -> str:
    import optuna

    names = optuna.get_all_study_names(storage)
    if len(names) != 1:
        raise ConfigError(f"name the study; this database holds {len(names)}: {', '.join(sorted(names)) or 'none'}")
    return names[0]


def _print_summary(study) -> None:
    from autofinetune.viewing.report import format_best_trial

    click.echo(format_best_trial(study))


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
        from autofinetune.spec.schema import load_spec

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
    from autofinetune.store.notes import fmt
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
