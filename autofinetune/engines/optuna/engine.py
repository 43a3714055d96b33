"""The Optuna engine: local worker processes (``--workers``) asking the study database for params."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from autofinetune.engines.base import EarlyStart, Engine, EngineOptions, option
from autofinetune.errors import ExitCode


@dataclass(frozen=True)
class OptunaOptions(EngineOptions):
    """Options of the Optuna engine.

    Attributes:
        workers: Local worker processes sharing the study (each runs
            ``search.trials_per_process`` trials, then is replaced by a fresh one); ``None``:
            one per GPU, else 1. With GPUs, that many workers spread over them in turn.
        gpus: ``--gpus``: ``None`` (every GPU found, else the CPU), ``"all"``, ``"none"`` or
            device ids separated by commas; each worker sees only its device.
        trials_per_gpu: ``--trials-per-gpu``: workers sharing each GPU (memory grows on demand).
    """

    workers: int | None = option(
        None, kind=int, minimum=1,
        help="Local worker processes [default: one per GPU, else 1]; with GPUs, spread over them in turn.",
    )
    gpus: str | None = option(
        None, metavar="all|none|0,1,...",
        help="GPUs for the workers, each seeing only its device [default: all found, else the CPU].",
    )
    trials_per_gpu: int | None = option(
        None, kind=int, minimum=1, help="Workers sharing each GPU (memory grows on demand) [default: 1]."
    )


class OptunaEngine(Engine[OptunaOptions]):
    """Runs trials in local worker processes; more workers may join from other machines."""

    name = "optuna"
    extra = None
    options_type = OptunaOptions

    def check(self, spec, options: OptunaOptions) -> None:
        from autofinetune.engines.optuna.supervisor import gpu_slots
        from autofinetune.errors import ConfigError

        if options.workers is not None and options.workers < 1:
            raise ConfigError(f"--workers: got {options.workers!r}; must be an integer >= 1")
        gpu_slots(options.gpus, options.workers, trials_per_gpu=options.trials_per_gpu)  # raises on bad --gpus

    def start_early(self, spec, url: str, options: OptunaOptions) -> EarlyStart:
        """The workers, started: each imports TensorFlow while launch checks the inputs and
        creates the study, then waits for :meth:`launch` to set it going."""
        supervisor = self._supervisor(spec, url, options)
        supervisor.prestart()
        return supervisor

    def launch(self, spec, url: str, study, options: OptunaOptions, early: EarlyStart | None = None) -> ExitCode:
        from autofinetune.engines.devices import describe_slots
        from autofinetune.engines.optuna.supervisor import WorkerSupervisor
        from autofinetune.engines.progress import StudyProgressMonitor, progress_wanted
        from autofinetune.logs import is_quiet
        from autofinetune.store.study import study_budget

        supervisor = early if isinstance(early, WorkerSupervisor) else self._supervisor(spec, url, options)
        slots = [slot.env for slot in supervisor.slots]
        if not is_quiet():
            print(describe_slots(slots), flush=True)
        # One worker on a terminal draws its own bars; otherwise (several workers, a notebook)
        # this process draws the study's, and the workers' lines go above it.
        monitor = StudyProgressMonitor(
            study, study_budget(study), enabled=progress_wanted(options.progress) and not supervisor.foreground
        )
        supervisor.monitor = monitor
        try:
            return ExitCode(supervisor.run())
        finally:
            monitor.close()

    def _supervisor(self, spec, url: str, options: OptunaOptions):
        from autofinetune.engines.optuna.supervisor import WorkerSupervisor, gpu_slots

        slots = gpu_slots(options.gpus, options.workers, trials_per_gpu=options.trials_per_gpu)
        return WorkerSupervisor(
            spec.name, url, slots=slots, deadline=options.deadline,
            artifacts=options.artifacts, foreground=sys.stderr.isatty(), outage_grace=spec.search.outage_grace,
        )
