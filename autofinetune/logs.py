"""Log levels and the log file of a process and of the worker processes it starts.

The command line decides once (``-q``, ``-v``, ``-vv``, ``--log-file``); the decision travels to
worker processes in the environment (:data:`LEVEL_ENV`, :data:`FILE_ENV`), whichever engine
starts them, and is read here. Every module logs through its own
``logging.getLogger(__name__)``; this module only configures handlers and levels.

TensorFlow's C++ code prints start-up lines (``port.cc``, ``cudart_stub.cc``, ``WARNING: All log
messages before absl::InitializeLog() ...``) while ``import tensorflow`` runs, before absl reads
any log level, so ``TF_CPP_MIN_LOG_LEVEL`` cannot hide them. Below ``-v`` the first import of
TensorFlow runs with the stderr file descriptor held in a file; afterwards every line that is not
start-up noise is passed on.

This is the bottom layer: it imports nothing of autofinetune.
"""

from __future__ import annotations

import importlib.abc
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

LEVEL_ENV = "AUTOFINETUNE_LOG_LEVEL"
FILE_ENV = "AUTOFINETUNE_LOG_FILE"

#: Without ``-q`` or ``-v``: warnings and errors.
DEFAULT_LEVEL = logging.WARNING
#: A log file records at least this much, whatever the terminal shows (as pip's ``--log``).
FILE_LEVEL = logging.INFO

CONSOLE_FORMAT = "[%(levelname).1s %(asctime)s %(name)s] %(message)s"
FILE_FORMAT = "[%(levelname).1s %(asctime)s pid %(process)d %(name)s] %(message)s"

#: Modules whose first import runs with native stderr filtered (below ``-v``).
NATIVE_NOISY_MODULES = ("tensorflow",)


@dataclass(frozen=True)
class LogSettings:
    """What :func:`configure_logging` set up.

    Args:
        level: The terminal's level (``logging.ERROR`` for ``-q`` ... ``logging.DEBUG`` for ``-vv``).
        log_file: The file that also receives the log lines, if any.
    """

    level: int
    log_file: Path | None = None


def level_from_flags(*, verbose: int = 0, quiet: bool = False) -> int | None:
    """The level the flags ask for: ``-q`` errors, ``-v`` info, ``-vv`` debug; ``None`` without flags.

    Raises:
        ValueError: both ``quiet`` and ``verbose``.
    """
    if quiet and verbose:
        raise ValueError("-q/--quiet and -v/--verbose contradict each other; give one of them")
    if quiet:
        return logging.ERROR
    if verbose >= 2:
        return logging.DEBUG
    if verbose == 1:
        return logging.INFO
    return None


def current_level() -> int:
    """The level of this process: :data:`LEVEL_ENV` (set by the command line), else the default.

    Raises:
        ValueError: :data:`LEVEL_ENV` holds something that is not a level name or number.
    """
    return _parse_level(os.environ.get(LEVEL_ENV))


def is_quiet() -> bool:
    """``-q`` was given (here or in the process that started this one): show errors only."""
    try:
        return current_level() >= logging.ERROR
    except ValueError:
        return False


def _parse_level(text: str | None) -> int:
    if text is None or not text.strip():
        return DEFAULT_LEVEL
    text = text.strip().upper()
    if text.isdigit():
        return int(text)
    levels = logging.getLevelNamesMapping()
    if text not in levels:
        allowed = ", ".join(name for name in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))
        raise ValueError(f"${LEVEL_ENV}: got {text!r}; allowed: {allowed} or a number")
    return levels[text]


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a line is logged.

    A notebook kernel or a test runner replaces ``sys.stderr``; a handler holding the stream of
    the moment it was made would write into a closed one later.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


#: The name of the handlers :func:`configure_logging` installs on the root logger: the next
#: configuration finds them there by it and replaces them.
HANDLER_NAME = "autofinetune"


def configure_logging(*, level: int | None = None, log_file: str | os.PathLike[str] | None = None) -> LogSettings:
    """Set up logging for this process and for the worker processes it will start.

    Installs a stderr handler at ``level`` and, with ``log_file``, a file handler (appending) at
    ``min(level, FILE_LEVEL)`` on the root logger; sets the ``autofinetune`` and ``optuna``
    loggers to the lower of both (Optuna's lines then go through these handlers too);
    routes ``warnings`` through logging; sets TensorFlow's native log levels; and, below INFO,
    filters TensorFlow's native start-up lines. Calling it again replaces the previous setup.

    Args:
        level: The terminal's level; ``None`` reads :data:`LEVEL_ENV` (the parent process's choice).
        log_file: A file to append log lines to; ``None`` reads :data:`FILE_ENV`.

    Returns:
        The settings in force, also written to :data:`LEVEL_ENV` and :data:`FILE_ENV` so that
        child processes inherit them.

    Raises:
        ValueError: :data:`LEVEL_ENV` is not a level.
        OSError: ``log_file`` cannot be opened for appending. A file named by :data:`FILE_ENV`
            that cannot be opened here (another machine) only gives a warning.
    """
    if level is None:
        level = current_level()
    inherited = log_file is None and bool(os.environ.get(FILE_ENV))
    if inherited:
        log_file = os.environ[FILE_ENV]
    path = Path(log_file).expanduser().resolve() if log_file is not None else None
    unwritable: OSError | None = None

    handlers: list[logging.Handler] = []
    console = _StderrHandler()
    console.setLevel(level)
    console.setFormatter(logging.Formatter(CONSOLE_FORMAT))
    handlers.append(console)
    lowest = level
    if path is not None:
        try:
            file_handler = logging.FileHandler(path, mode="a", encoding="utf-8")
        except OSError as error:
            if not inherited:
                raise
            # A worker on another machine (a Ray node) may not have the folder: log to stderr only.
            unwritable, path = error, None
        else:
            file_level = min(level, FILE_LEVEL)
            file_handler.setLevel(file_level)
            file_handler.setFormatter(logging.Formatter(FILE_FORMAT))
            handlers.append(file_handler)
            lowest = min(lowest, file_level)

    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        handler.set_name(HANDLER_NAME)
        root.addHandler(handler)
    logging.getLogger("autofinetune").setLevel(lowest)
    logging.captureWarnings(True)
    _route_optuna(lowest)

    # A name when the level has one (readable in `env`), else the number (read back the same).
    name = logging.getLevelName(level)
    os.environ[LEVEL_ENV] = name if logging.getLevelNamesMapping().get(name) == level else str(level)
    if path is not None:
        os.environ[FILE_ENV] = str(path)
    set_native_log_levels(level)
    if level > logging.INFO:
        install_native_startup_filter()
    else:
        remove_native_startup_filter()
    if unwritable is not None:
        logger.warning("cannot append to the log file of $%s here (%s); logging to stderr only", FILE_ENV, unwritable)
    logger.debug("log level %s%s", logging.getLevelName(level), f", log file {path}" if path else "")
    return LogSettings(level=level, log_file=path)


def quiet_library_output() -> None:
    """Keep TensorFlow as quiet in this process as the command line keeps it, without touching
    the process's own logging setup (a notebook's, a user's script's).

    Below ``-v`` (:func:`current_level`), TensorFlow's native start-up lines are filtered and its
    C++ logs turned off, when TensorFlow is not imported yet (native code reads its levels when
    it loads); its Python logger keeps errors only (every trial builds a new model, so
    retracing warnings are expected).
    """
    level = current_level()
    if "tensorflow" not in sys.modules:
        set_native_log_levels(level)
        if level > logging.INFO:
            install_native_startup_filter()
    tensorflow_logger = logging.getLogger("tensorflow")
    if level > logging.DEBUG and _errors_only not in tensorflow_logger.filters:
        # A filter, not a level: TensorFlow sets its logger to INFO when it first logs in an
        # interactive shell (a notebook), over any level set before.
        tensorflow_logger.addFilter(_errors_only)


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def _route_optuna(level: int) -> None:
    """Optuna's loggers follow ``level`` and write through the root handlers (terminal and file)."""
    try:
        import optuna
    except ImportError:  # the storage layer needs it, but logging must not be what fails
        return
    optuna.logging.set_verbosity(level)
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()


# --- native (C++) logs -----------------------------------------------------------------------


def set_native_log_levels(level: int) -> None:
    """Set the log levels TensorFlow's C++ code reads, from this process's level.

    ``-vv`` shows everything, ``-v`` warnings and errors, otherwise nothing: TensorFlow's C++
    errors at start-up are about drivers the machine does not have (``failed call to cuInit``);
    real failures reach Python as exceptions. Worker processes inherit the variables.
    """
    if level <= logging.DEBUG:
        tf_level, glog_level = "0", "0"
    elif level <= logging.INFO:
        tf_level, glog_level = "1", "1"
    else:
        tf_level, glog_level = "3", "3"
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = tf_level
    os.environ["GLOG_minloglevel"] = glog_level
    os.environ["ABSL_MIN_LOG_LEVEL"] = glog_level


#: A line of absl/glog format: severity and month-day, time (before absl starts: 00:00:<unix time>),
#: thread, file:line].
_NATIVE_LINE = re.compile(rb"^(?P<severity>[IWEF])\d{4} [\d:.]+\s+\d+ (?P<file>[\w.-]+):\d+\] ")
#: Error lines at start-up that only say a GPU driver or library is absent or registered twice.
_NOISE_ERROR_FILES = frozenset(
    {b"cuda_platform.cc", b"cuda_dnn.cc", b"cuda_fft.cc", b"cuda_blas.cc", b"cuda_executor.cc", b"cudart_stub.cc"}
)
_NOISE_PREFIXES = (
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    b"To enable the following instructions:",
)


def is_native_startup_noise(line: bytes) -> bool:
    """Whether a line written to stderr while TensorFlow loads is start-up noise.

    Info and warning lines in absl's format are; error lines only from the files that report a
    missing GPU driver; absl's own preamble and the CPU-instructions hint are. Anything else
    (fatal lines, Python output) is kept.
    """
    stripped = line.strip()
    if stripped.startswith(_NOISE_PREFIXES):
        return True
    match = _NATIVE_LINE.match(stripped)
    if match is None:
        return False
    severity = match.group("severity")
    return severity in (b"I", b"W") or (severity == b"E" and match.group("file") in _NOISE_ERROR_FILES)


@contextmanager
def native_startup_filtered() -> Iterator[None]:
    """Hold what is written to the stderr file descriptor meanwhile, then pass on all but noise.

    Native code writes to file descriptor 2 directly, so ``sys.stderr`` cannot be swapped; the
    descriptor is pointed at a temporary file instead. Python output of the same time is held
    too and passed on afterwards, in order.
    """
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all (a daemon): nothing to filter
        yield
        return
    _flush_stderr()
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            _flush_stderr()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().splitlines(keepends=True) if not is_native_startup_noise(line)]
            if kept:
                os.write(2, b"".join(kept))


def _flush_stderr() -> None:
    try:
        sys.stderr.flush()
    except (AttributeError, ValueError, OSError):
        pass


class _FilteredLoader(importlib.abc.Loader):
    """Runs the wrapped loader's ``exec_module`` inside :func:`native_startup_filtered`."""

    def __init__(self, loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        with native_startup_filtered():
            self._loader.exec_module(module)

    def __getattr__(self, name: str):
        # get_resource_reader, get_source, is_package, ...: the real loader's
        return getattr(self._loader, name)


class _NativeStartupFilter(importlib.abc.MetaPathFinder):
    """Finds the named modules with the other finders and wraps their loader.

    An import hook rather than an explicit ``import tensorflow`` at start-up: TensorFlow is
    imported lazily wherever a command first needs it (any engine, export, predict), and
    commands that never train do not pay for it.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = frozenset(names)

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.names or fullname in sys.modules:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _FilteredLoader(spec.loader)
        return spec


def install_native_startup_filter(names: Sequence[str] = NATIVE_NOISY_MODULES) -> None:
    """Filter native start-up lines while any of ``names`` is first imported in this process."""
    remove_native_startup_filter()
    sys.meta_path.insert(0, _NativeStartupFilter(names))


def remove_native_startup_filter() -> None:
    """Undo :func:`install_native_startup_filter` (``-v``: every native line is shown)."""
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _NativeStartupFilter)]
