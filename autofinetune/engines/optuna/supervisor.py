"""Supervise local worker processes: start K, replace recycled or crashed ones, stop cleanly.

Trials run in child processes, never in the supervisor, for two reasons: TensorFlow does not
give memory back between trials (a worker is replaced after ``trials_per_process`` trials, which
keeps memory flat), and a worker that dies mid-trial takes nothing else down (its trial is found
stale and retried).

``launch`` starts the first workers before the study exists (:meth:`WorkerSupervisor.prestart`):
each imports TensorFlow (seconds) while ``launch`` checks the images and creates the study, then
waits for a ``go`` line on its standard input.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Sequence

from autofinetune.engines.base import EarlyStart
from autofinetune.engines.devices import GpuDiscovery, parse_gpus, worker_environments
from autofinetune.errors import ExitCode
from autofinetune.store.artifacts import ARTIFACTS_ENV
from autofinetune.store.database import STORAGE_ENV
from autofinetune.store.outages import OUTAGE_GRACE_ENV

#: A slot whose worker crashes this many times in a row is given up.
MAX_CRASHES_PER_SLOT = 3


@dataclass
class _Slot:
    index: int
    env: dict[str, str]
    process: subprocess.Popen | None = None
    crashes: int = 0
    readers: list[threading.Thread] = field(default_factory=list)
    #: Started by :meth:`WorkerSupervisor.prestart` and not yet told to go.
    waiting: bool = False
    #: Crashed :data:`MAX_CRASHES_PER_SLOT` times in a row: no worker runs here any more.
    given_up: bool = False


def _pump(stream: IO[str], write, prefix: str) -> None:
    for line in stream:
        write(prefix + line.rstrip("\n"))


#: The line on a pre-started worker's standard input that sets it to work.
GO = "go"


class WorkerSupervisor(EarlyStart):
    """Runs one worker process per slot until the study's budget is used.

    Args:
        study_name: The study to work on.
        storage_url: Its database URL; passed to children in the environment, never on their
            command line, so a password does not show in process listings.
        slots: Extra environment of each worker process (e.g. ``CUDA_VISIBLE_DEVICES``).
        deadline: Unix time after which no new trial starts.
        artifacts: Checkpoint location override.
        foreground: With one slot, let the worker draw its own progress bars on this terminal.
        monitor: A :class:`~autofinetune.engines.progress.StudyProgressMonitor` for several slots.
        outage_grace: The study's ``search.outage_grace``, for workers that start while the
            database is away (they read it from the study once they reach it).
    """

    def __init__(
        self,
        study_name: str,
        storage_url: str,
        *,
        slots: Sequence[dict[str, str]],
        deadline: float | None = None,
        artifacts: str | None = None,
        foreground: bool = False,
        monitor=None,
        outage_grace: float | None = None,
    ) -> None:
        self.study_name = study_name
        self.outage_grace = outage_grace
        self.storage_url = storage_url
        self.deadline = deadline
        self.artifacts = artifacts
        self.foreground = foreground and len(slots) == 1
        self.monitor = monitor
        self.slots = [_Slot(index=i, env=dict(env)) for i, env in enumerate(slots)]

    def _command(self, slot: _Slot, *, wait_for_go: bool) -> list[str]:
        command = [sys.executable, "-m", "autofinetune.cli", "worker-process", self.study_name, "--worker-index", str(slot.index)]
        if self.deadline is not None:
            command += ["--deadline", repr(self.deadline)]
        if self.foreground:
            command.append("--progress")
        if wait_for_go:
            command.append("--wait-for-go")
        return command

    def _start(self, slot: _Slot, *, wait_for_go: bool = False) -> None:
        env = dict(os.environ, **slot.env)
        env[STORAGE_ENV] = self.storage_url
        env.setdefault("PYTHONUNBUFFERED", "1")
        if self.artifacts:
            env[ARTIFACTS_ENV] = self.artifacts
        if self.outage_grace is not None:
            env[OUTAGE_GRACE_ENV] = repr(float(self.outage_grace))
        stdin = subprocess.PIPE if wait_for_go else None
        slot.waiting = wait_for_go
        if self.foreground:
            slot.process = subprocess.Popen(self._command(slot, wait_for_go=wait_for_go), env=env, stdin=stdin, text=True)
            return
        slot.process = subprocess.Popen(
            self._command(slot, wait_for_go=wait_for_go), env=env, stdin=stdin, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, bufsize=1,
        )
        reader = threading.Thread(target=_pump, args=(slot.process.stdout, self._say, f"[worker {slot.index}] "), daemon=True)
        reader.start()
        slot.readers = [reader]

    def prestart(self) -> None:
        """Start every slot's worker now, before the study exists.

        Each imports its libraries (TensorFlow: seconds) and then waits until :meth:`run` tells
        it to go, or :meth:`cancel` stops it; it touches neither the study nor a GPU's memory.
        """
        for slot in self.slots:
            self._start(slot, wait_for_go=True)

    def cancel(self) -> None:
        """Stop the pre-started workers never told to go (the launch was refused)."""
        for slot in self.slots:
            if slot.waiting and slot.process is not None:
                slot.process.kill()
                slot.process.wait()
                slot.process, slot.waiting = None, False

    def _go(self, slot: _Slot) -> None:
        slot.waiting = False
        try:
            slot.process.stdin.write(GO + "\n")  # type: ignore[union-attr]
            slot.process.stdin.close()  # type: ignore[union-attr]
        except (BrokenPipeError, OSError):
            pass  # it died while waiting: _check sees its exit code and starts a replacement

    def run(self) -> int:
        """Supervise until every slot is done.

        A worker that exits because the study database stayed away past its grace is not
        replaced, and stops nobody: the others meet the same outage and end the same way.

        Returns:
            0 when the budget was used (or the deadline passed); 2 when a worker reported bad
            input or a fatal error (the others are stopped, their trials queued again); 75 when
            the study database stayed unreachable; 1 when a slot's workers kept crashing; 130
            after Ctrl-C.
        """
        for slot in self.slots:
            if slot.waiting and slot.process is not None:
                self._go(slot)
            else:
                self._start(slot)
        outcome: int = ExitCode.DONE
        try:
            while any(slot.process is not None for slot in self.slots):
                for slot in self.slots:
                    outcome = max(outcome, self._check(slot), key=_severity)
                if outcome == ExitCode.BAD_INPUT:
                    self._stop_all(signal.SIGTERM)
                if self.monitor is not None:
                    self.monitor.poll()
                time.sleep(0.5)
        except KeyboardInterrupt:
            self._stop_all(signal.SIGINT)
            return ExitCode.INTERRUPTED
        finally:
            for slot in self.slots:
                for reader in slot.readers:
                    reader.join(timeout=5)
        given_up = [slot.index for slot in self.slots if slot.given_up]
        if given_up and outcome == ExitCode.DONE:
            self._say(f"error: worker slot(s) {', '.join(map(str, given_up))} crashed {MAX_CRASHES_PER_SLOT} times in "
                      "a row and were given up; their lines above say why")
            return ExitCode.CRASHED
        return outcome

    def _check(self, slot: _Slot) -> int:
        if slot.process is None:
            return ExitCode.DONE
        code = slot.process.poll()
        if code is None:
            return ExitCode.DONE
        slot.process = None
        past_deadline = self.deadline is not None and time.time() >= self.deadline
        if code == ExitCode.RECYCLE and not past_deadline:
            slot.crashes = 0
            self._start(slot)
            return ExitCode.DONE
        if code in (ExitCode.DONE, ExitCode.RECYCLE):
            return ExitCode.DONE
        if code in (ExitCode.BAD_INPUT, ExitCode.INTERRUPTED, ExitCode.DATABASE_UNREACHABLE):
            return code
        # Killed or crashed: its running trial goes stale and is retried by the replacement.
        slot.crashes += 1
        slot.given_up = slot.crashes >= MAX_CRASHES_PER_SLOT
        self._say(f"worker {slot.index} exited with code {code}; " + (
            "giving this slot up" if slot.given_up else "starting a replacement"
        ))
        if not slot.given_up and not past_deadline:
            self._start(slot)
        return ExitCode.DONE

    def _say(self, line: str) -> None:
        (self.monitor.write if self.monitor is not None else print)(line)

    def _stop_all(self, sig: int) -> None:
        for slot in self.slots:
            if slot.process is not None and slot.process.poll() is None:
                slot.process.send_signal(sig)
        for slot in self.slots:
            if slot.process is not None:
                try:
                    slot.process.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    slot.process.kill()
                slot.process = None


def _severity(code: int) -> int:
    order = (ExitCode.DONE, ExitCode.INTERRUPTED, ExitCode.DATABASE_UNREACHABLE, ExitCode.BAD_INPUT)
    return order.index(code) if code in order else 0


def gpu_slots(gpus: str | None, workers: int | None = None, *, trials_per_gpu: int | None = None,
              discovery: GpuDiscovery | None = None) -> list[dict[str, str]]:
    """The extra environment of each local worker: one device per worker where there are GPUs.

    Args:
        gpus: ``--gpus``: ``None`` (every GPU found, else the CPU), ``"all"``, ``"none"``, or
            device ids separated by commas (see :func:`~autofinetune.engines.devices.parse_gpus`).
        workers: ``--workers``: without GPUs the number of workers (default 1); with GPUs that
            many workers spread over them in turn.
        trials_per_gpu: ``--trials-per-gpu``: workers sharing each GPU (default 1).
        discovery: The GPUs found (default: :func:`~autofinetune.engines.devices.discover_gpus`).

    Raises:
        ConfigError: a malformed or unknown ``--gpus``, or both ``workers`` and ``trials_per_gpu``.
    """
    return worker_environments(parse_gpus(gpus, discovery), workers=workers, trials_per_gpu=trials_per_gpu)
