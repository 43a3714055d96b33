"""The commands that run trials: ``run-trial``, ``launch``, ``worker`` (and the worker processes).

Each engine's ``launch`` flags come from its options dataclass (:func:`engine_options`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Literal

import click

from autofinetune.cli.main import main, print_summary, say, skip_unreadable_option, storage_option
from autofinetune.engines.base import ENGINES
from autofinetune.errors import ConfigError, ExitCode

# Named, not __name__: the worker processes' lines keep the name they always had.
logger = logging.getLogger("autofinetune.cli")


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
@skip_unreadable_option
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
    from autofinetune.trial.devices import prepare_devices
    from autofinetune.trial.features import FeatureCache
    from autofinetune.trial.schedule import run_trial
    from autofinetune.viewing.report import format_trial_result

    prepare_devices()
    feature_cache: FeatureCache | Literal[False] = False if no_cache else FeatureCache.from_spec(spec, directory=cache_dir)
    data = load_data(spec)
    result = run_trial(spec, trial_params, data, checkpoint_path=checkpoint, feature_cache=feature_cache)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(format_trial_result(result, data_source=data.source))
    if result.state == "failed":
        sys.exit(1)


def _click_option(name: str, form, *, default, engine: str | None):
    """A click option of an engine option's command-line form (:func:`autofinetune.engines.base.option`).

    Its default is ``None``: an option left out is not passed, and keeps the engine's default.
    """
    kind: click.ParamType
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
@storage_option
@skip_unreadable_option
@click.option("--engine", type=click.Choice(list(ENGINES)), default="optuna", show_default=True,
              help="Who runs the trials; every engine writes into the same study database.")
@_engine_options
@click.option("--mlflow", metavar="URI", help="Log every trial to this MLflow tracking URI (as tracking.mlflow).")
@click.option("--mlflow-register", metavar="NAME",
              help="Register the best trial's model in MLflow's model registry as NAME (as tracking.mlflow_register).")
@click.option("--wandb", metavar="PROJECT", help="Log every trial to this Weights & Biases project (as tracking.wandb).")
@click.option("--tensorboard", metavar="DIR", help="Write every trial's TensorBoard events under DIR/STUDY-ID/trial_N (as tracking.tensorboard).")
@click.option("--warm-start", "warm_start", metavar="STUDY[,STUDY...]", multiple=True,
              help="Start a new study from earlier ones, NAME (same database) or NAME@URL: their best configurations "
                   "run after the baseline, and the sampler starts from their trials (as search.warm_start).")
def launch(spec_file: Path, study_name: str | None, n_trials: int | None, timeout: float | None, storage: str | None,
           skip_unreadable: bool, engine: str, mlflow: str | None, mlflow_register: str | None, wandb: str | None,
           tensorboard: str | None, warm_start: tuple[str, ...], **engine_options: Any) -> None:
    """Create or resume the study of SPEC_FILE and run its trials.

    The options tagged [optuna], [ray] or [keras-tuner] belong to that engine (--engine).
    """
    from autofinetune.api import run_launch

    study, code = run_launch(
        spec_file, n_trials=n_trials, timeout=timeout, storage=storage, engine=engine,
        skip_unreadable=skip_unreadable, mlflow=mlflow, wandb=wandb, tensorboard=tensorboard,
        mlflow_register=mlflow_register, study_name=study_name, warm_start=list(warm_start) or None, announce=say, warn=lambda line: click.echo(line, err=True),
        **engine_options,
    )
    if code == ExitCode.DATABASE_UNREACHABLE:
        click.echo("fatal: the study database stayed unreachable past search.outage_grace; finished trials are "
                   "kept: run the same launch again to resume once the database is back", err=True)
    else:
        print_summary(study)
    sys.exit(int(code))


@main.command()
@click.argument("study_name")
@storage_option
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
        print_summary(study)
    sys.exit(code)


@main.command("worker-process", hidden=True)
@click.argument("study_name")
@click.option("--worker-index", type=int, default=0)
@click.option("--deadline", type=float)
@click.option("--progress", is_flag=True)
@click.option("--wait-for-go", is_flag=True, help="Import the libraries, then wait for a 'go' line on stdin.")
@storage_option
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
        from autofinetune.trial.devices import prepare_devices

        prepare_devices()  # imports Keras and its backend; before anything touches a GPU
        return sys.stdin.readline().strip() == GO
    except KeyboardInterrupt:
        return False
