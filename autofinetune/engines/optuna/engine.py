"""The Optuna engine: local worker processes (``--workers``) asking the study database for params."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from autofinetune.engines.base import Engine, EngineOptions
from autofinetune.errors import ExitCode


@dataclass(frozen=True)
class OptunaOptions(EngineOptions):
    """Options of the Optuna engine.

    Attributes:
        workers: Local worker processes sharing the study (each runs
            ``search.trials_per_process`` trials, then is replaced by a fresh one).
    """

    workers: int = 1


class OptunaEngine(Engine):
    """Runs trials in local worker processes; more workers may join from other machines."""

    name = "optuna"
    extra = None
    options_type = OptunaOptions

    def check(self, spec, options: OptunaOptions) -> None:
        from autofinetune.errors import ConfigError

        if options.workers < 1:
            raise ConfigError(f"--workers: got {options.workers!r}; must be an integer >= 1")

    def launch(self, spec, url: str, study, options: OptunaOptions) -> ExitCode:
        from autofinetune.engines.optuna.supervisor import WorkerSupervisor, gpu_slots
        from autofinetune.engines.progress import StudyProgressMonitor
        from autofinetune.store.study import study_budget

        interactive = sys.stderr.isatty()
        monitor = StudyProgressMonitor(study, study_budget(study), enabled=interactive and options.workers > 1)
        supervisor = WorkerSupervisor(
            spec.name, url, slots=gpu_slots(None, options.workers), deadline=options.deadline,
            artifacts=options.artifacts, foreground=interactive, monitor=monitor,
        )
        try:
            return ExitCode(supervisor.run())
        finally:
            monitor.close()
