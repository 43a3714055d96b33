"""The commands that read a study: ``status``, ``studies``, ``dashboard``, ``export``,
``predict``, ``report``; and ``make-digits-folder`` for a first study's images.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from autofinetune.cli.main import artifacts_option, main, only_study, storage_option, study_for
from autofinetune.errors import ConfigError


@main.command()
@click.argument("study_name", required=False)
@storage_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document: the study, every trial, the best one.")
def status(study_name: str | None, storage: str | None, as_json: bool) -> None:
    """A table of the trials of STUDY_NAME (or of the database's only study) and the best one."""
    from autofinetune.viewing.report import format_study_status, study_status_document
    from autofinetune.store.database import load_study, open_storage, resolve_storage_url

    url = resolve_storage_url(storage)
    backend = open_storage(url, create=False)
    study = load_study(study_name or only_study(backend), backend)
    if as_json:
        click.echo(json.dumps(study_status_document(study), indent=2, allow_nan=False))
    else:
        click.echo(format_study_status(study))


@main.command()
@storage_option
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


@main.command()
@click.argument("study_or_spec", required=False)
@storage_option
@click.option("--host", help="Address to listen on [default: the config's, else 127.0.0.1: this machine only].")
@click.option("--port", type=click.IntRange(0, 65535), help="Port [default: the config's, else 8080]; 0 picks a free one.")
@artifacts_option
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
@storage_option
@artifacts_option
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
    from autofinetune.store.artifacts import artifacts_location, open_artifact_store

    study, url = study_for(study_name, storage)
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
@storage_option
@click.option("--out", type=click.Path(path_type=Path), default=Path("report.html"), show_default=True,
              help="The HTML file to write.")
def report(study_name: str | None, storage: str | None, out: Path) -> None:
    """Write STUDY_NAME as one static HTML page (plots and trials) to share without a server."""
    from autofinetune.viewing.html_report import write_report

    study, _ = study_for(study_name, storage)
    path = write_report(study, out)
    click.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB; opens offline in a browser)")
