"""The ``autofinetune`` command line.

Exit codes: 0 success, 1 an unexpected error, 2 bad input (nothing was written), 130 Ctrl-C.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from autofinetune.errors import ConfigError, FatalError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


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
            ctx.exit(EXIT_BAD_INPUT)
        except FatalError as error:
            click.echo(f"fatal: {error}", err=True)
            ctx.exit(EXIT_BAD_INPUT)


@click.group(cls=_Group)
@click.version_option(package_name="autofinetune")
def main() -> None:
    """Search the two-phase ResNet50 fine-tuning schedule into an Optuna study database."""
    _quiet_frameworks()


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
    from autofinetune.config import load_spec
    from autofinetune.search_space import complete_params, parse_param_assignments

    spec = load_spec(spec_file)
    trial_params = complete_params(spec, parse_param_assignments(list(params)))
    if checkpoint is not None and checkpoint.suffix != ".keras":
        raise ConfigError(f"--checkpoint: got {str(checkpoint)!r}; the file name must end in .keras")

    from autofinetune.data import load_data
    from autofinetune.report import format_trial_result
    from autofinetune.schedule import run_trial

    from autofinetune.features import FeatureCache

    feature_cache = False if no_cache else FeatureCache.from_spec(spec, directory=cache_dir)
    data = load_data(spec)
    result = run_trial(spec, trial_params, data, checkpoint_path=checkpoint, feature_cache=feature_cache)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(format_trial_result(result, data_source=data.source))
    if result.state == "failed":
        sys.exit(1)


@main.command("make-digits-folder")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--image-size", type=click.IntRange(8, 1024), default=32, show_default=True)
def make_digits_folder(folder: Path, image_size: int) -> None:
    """Write scikit-learn's handwritten digits as an image folder (one sub-folder per class)."""
    from autofinetune.data import digits_images, write_image_folder

    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(f"folder {str(folder)!r} is not empty; choose a new or empty folder")
    x, y, names = digits_images(image_size)
    write_image_folder(folder, x, y, names)
    click.echo(f"wrote {len(x)} images in {len(names)} classes to {folder}")


if __name__ == "__main__":  # pragma: no cover
    main()
