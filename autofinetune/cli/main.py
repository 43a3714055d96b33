"""The ``autofinetune`` command group: its options, its error handling, and what commands share.

Exit codes: 0 success, 1 an unexpected error (for ``launch``: worker processes that kept
crashing), 2 bad input (nothing was written) or a fatal error, 75 the study database stayed
unreachable past ``search.outage_grace`` (launch again to resume), 130 Ctrl-C.
"""

from __future__ import annotations

from pathlib import Path

import click

from autofinetune.errors import ConfigError, ExitCode, FatalError


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


def say(line: str) -> None:
    """A line of progress for the terminal (stdout), left out with -q."""
    from autofinetune.logs import is_quiet

    if not is_quiet():
        click.echo(line)


def skip_unreadable_option(function):
    return click.option(
        "--skip-unreadable", is_flag=True,
        help="Leave out image files that cannot be decoded, with one warning (as data.skip_unreadable = true).",
    )(function)


def storage_option(function):
    return click.option(
        "--storage", metavar="URL",
        help="SQLAlchemy URL of the study database "
             "[default: $AUTOFINETUNE_STORAGE, $OPTUNA_STORAGE, the spec's, or sqlite:///autofinetune.db].",
    )(function)


def artifacts_option(function):
    return click.option(
        "--artifacts", metavar="DIR_OR_URL",
        help="Where trial checkpoints go [default: beside a SQLite database, else ./autofinetune-artifacts].",
    )(function)


def only_study(storage) -> str:
    import optuna

    names = optuna.get_all_study_names(storage)
    if len(names) != 1:
        raise ConfigError(f"name the study; this database holds {len(names)}: {', '.join(sorted(names)) or 'none'}")
    return names[0]


def print_summary(study) -> None:
    """The study's best trial, or one line on why it cannot be read now."""
    from autofinetune.store.outages import StorageUnavailableError
    from autofinetune.viewing.report import format_best_trial

    try:
        say(format_best_trial(study))
    except StorageUnavailableError as error:
        click.echo(f"warning: no summary: {error}", err=True)


def study_for(name: str | None, storage: str | None):
    """``(study, url)`` of STUDY_NAME (or the database's only study)."""
    from autofinetune.store.database import load_study, open_storage, resolve_storage_url

    url = resolve_storage_url(storage)
    backend = open_storage(url, create=False)
    return load_study(name or only_study(backend), backend), url
