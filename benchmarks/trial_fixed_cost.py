"""Benchmark: what a trial costs outside its training epochs, and what a pruned trial costs.

A trial's wall time is its steady-state epochs plus a fixed cost: building the backbone and the
classifier, looking up the cached features, compiling, tracing the train and test steps (paid
inside the first epoch of each phase), snapshotting the best epoch and saving the checkpoint.
This runs ``run_trial`` on ResNet50 at 32x32 on the digits folder with a warm feature cache,
the same parameter sets in the same order, and splits each trial's wall time into:

* ``fit``: the epochs at their steady-state speed (each phase's median epoch after its first);
* ``kept``: phases trained on models kept from an earlier trial (steps traced then);
* ``fixed``: everything else, itemised as build (backbone + classifier), cache (feature lookup
  and the frozen-prefix model), compile, trace (the first epoch's excess over the steady one),
  save (the ``.keras`` checkpoint) and the rest.

Each parameter set runs as the first trial of its shapes in the process (classifier and
compiled parts built, compiled and traced anew), then again on the models that first trial kept
(:mod:`autofinetune.trial.reuse`), then with the cache off (the steady-state phase-1 epoch with
and without the cache); then every set again, both ways, pruned after its first epoch (what
most trials of a search are). Run it from two checkouts at the same time to compare them side
by side.

    python benchmarks/trial_fixed_cost.py                # 6 complete + 6 pruned trials
    python benchmarks/trial_fixed_cost.py --trials 3     # shorter
    python benchmarks/trial_fixed_cost.py --smoke        # tiny backbone, seconds (a test runs it)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package

from autofinetune.spec import parse_spec  # noqa: E402

#: (module, function) pairs whose time is charged to a fixed-cost item.
TIMED = {
    "build": [("autofinetune.trial.backbones", "build_backbone"), ("autofinetune.trial.model", "build_classifier")],
    "cache": [("autofinetune.trial.features", "cached_features_together"), ("autofinetune.trial.model", "build_cuts_extractor"),
              ("autofinetune.trial.model", "build_trainable_part")],
    "compile": [("autofinetune.trial.model", "compile_for_training")],
}


class Clock:
    """Seconds spent in the timed functions, per item, since the last :meth:`take`."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = defaultdict(float)

    def wrap(self, item: str, function: Callable) -> Callable:
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.spent[item] += time.perf_counter() - started

        return timed

    def take(self) -> dict[str, float]:
        spent, self.spent = dict(self.spent), defaultdict(float)
        return spent


@contextlib.contextmanager
def timed_functions(clock: Clock) -> Iterator[None]:
    """Charge the time of :data:`TIMED`'s functions (and of ``Model.save``) to their items."""
    import importlib

    import keras

    originals = []
    for item, names in TIMED.items():
        for module_name, function_name in names:
            module = importlib.import_module(module_name)
            if hasattr(module, function_name):
                original = getattr(module, function_name)
                originals.append((module, function_name, original))
                setattr(module, function_name, clock.wrap(item, original))
    save = keras.Model.save
    keras.Model.save = clock.wrap("save", save)
    try:
        yield
    finally:
        keras.Model.save = save
        for module, function_name, original in originals:
            setattr(module, function_name, original)


class EpochClock:
    """A reporter that remembers when each epoch ended, and prunes after ``prune_after`` epochs."""

    def __init__(self, prune_after: int | None = None) -> None:
        self.prune_after = prune_after
        self.ends: list[tuple[int, float]] = []

    def report(self, step: int, metrics) -> None:
        from autofinetune.errors import PruneTrial

        self.ends.append((step, time.perf_counter()))
        if self.prune_after is not None and step >= self.prune_after:
            raise PruneTrial(f"pruned at step {step}")


def phase_epoch_seconds(result, ends: list[tuple[int, float]], phase: int) -> tuple[float | None, int]:
    """(A phase's steady-state epoch: its median epoch after the first, epochs it ran)."""
    times = dict(ends)
    steps = [r.step for r in result.history if r.phase == phase and r.step in times]
    durations = [times[s] - times[s - 1] for s in steps[1:] if s - 1 in times]
    return (statistics.median(durations) if durations else None), len(steps)


def steady_epoch_seconds(result, ends: list[tuple[int, float]]) -> float:
    """The epochs run, each at its phase's steady-state speed."""
    total = 0.0
    for summary in result.phases:
        epoch, count = phase_epoch_seconds(result, ends, summary.phase)
        total += (epoch or 0.0) * count
    return total


def make_spec(folder: Path, cache_dir: Path, *, weights: str, backbone: str, image_size: int):
    return parse_spec(
        {
            "name": "fixed-cost",
            "seed": 0,
            "data": {"source": str(folder), "image_size": image_size, "validation_split": 0.2, "batch_size": 32},
            "backbone": {"name": backbone, "weights": weights},
            "schedule": {"phase1_epochs": 3, "phase2_epochs": 3, "phase1_optimizer": "rmsprop"},
            "search": {"unfreeze_depth": {"low": 0, "high": 2}},
            "cache": {"enabled": True, "dir": str(cache_dir)},
        },
        origin="benchmark spec",
    )


def trial_params(spec, n: int) -> list[dict[str, Any]]:
    from autofinetune.search.space import complete_params

    depths = [0, 2, 1, 2, 0, 1]  # the first three (the warm-up) fill the cache at every depth
    units = [128, 256, 512, 1024]
    return [
        complete_params(spec, {"head_units": units[i % 4], "unfreeze_depth": depths[i % len(depths)],
                               "phase1_lr": 1e-3, "phase2_lr": 1e-4})
        for i in range(n)
    ]


def run(args) -> None:
    from autofinetune.data.sources import digits_images, load_data, write_image_folder
    from autofinetune.trial.features import FeatureCache
    from autofinetune.trial.schedule import run_trial
    from autofinetune.trial.session import TrialSession
    from autofinetune.viewing.report import format_table

    work = Path(tempfile.mkdtemp(prefix="autofinetune-fixed-cost-"))
    folder = work / f"digits-{args.image_size}px"
    x, y, names = digits_images(args.image_size)
    write_image_folder(folder, x, y, names)
    spec = make_spec(folder, work / "cache", weights=args.weights, backbone=args.backbone, image_size=args.image_size)
    data = load_data(spec)
    cache = FeatureCache.from_spec(spec)
    session = TrialSession(cache)  # as an engine's worker keeps from trial to trial
    params = trial_params(spec, args.trials)
    clock = Clock()
    print(f"{args.backbone} {args.image_size}x{args.image_size}, {len(data.x_train)} training + {len(data.x_val)} validation images, 3+3 epochs, "
          f"weights {args.weights}; warm-up trials fill the feature cache and trace once", flush=True)

    def one_trial(p, *, prune_after, keep, cached=True) -> dict[str, float]:
        reporter = EpochClock(prune_after)
        checkpoint = work / "model.keras"
        clock.take()
        started = time.perf_counter()
        result = run_trial(spec, p, data, reporter=reporter, checkpoint_path=checkpoint,
                           keep_checkpoint=lambda state, value: keep, feature_cache=None if cached else False,
                           session=session)
        wall = time.perf_counter() - started
        items = clock.take()
        steady = steady_epoch_seconds(result, reporter.ends)
        fit_total = sum(s.seconds for s in result.phases)  # phase setup + compile + every epoch
        setup = items.get("cache", 0.0) + items.get("compile", 0.0)
        epochs_run = len(result.history)
        # The phases' time minus setup minus steady epochs is the first epochs' excess: tracing.
        trace = max(0.0, fit_total - setup - steady) if epochs_run > len(result.phases) else 0.0
        fixed = wall - steady
        other = fixed - sum(items.values()) - trace
        return {"wall": wall, "fit": steady, "fixed": fixed, **{k: items.get(k, 0.0) for k in ("build", "cache", "compile", "save")},
                "trace": trace, "other": other, "epochs": epochs_run,
                "phase1_epoch": phase_epoch_seconds(result, reporter.ends, 1)[0],
                "kept": result.extra["performance"]["phases_on_kept_models"]}

    try:
        with timed_functions(clock):
            for p in params[: args.warmup]:
                one_trial(p, prune_after=None, keep=False)
            anew, kept, uncached, pruned_anew, pruned_kept = [], [], [], [], []
            for i, p in enumerate(params):  # interleaved: all see the same load
                session.forget_kept_models()  # the first trial of its shapes in this process...
                anew.append(one_trial(p, prune_after=None, keep=i == 0))
                kept.append(one_trial(p, prune_after=None, keep=i == 0))  # ...and the next one
                uncached.append(one_trial(p, prune_after=None, keep=False, cached=False))
            for p in params:
                session.forget_kept_models()
                pruned_anew.append(one_trial(p, prune_after=1, keep=False))
                pruned_kept.append(one_trial(p, prune_after=1, keep=False))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    columns = ["wall", "fit", "fixed", "build", "cache", "compile", "trace", "save", "other"]
    rows = []
    for label, trials in (("complete, models built anew", anew), ("complete, models kept", kept),
                          ("complete, cache off", uncached), ("pruned after epoch 1, built anew", pruned_anew),
                          ("pruned after epoch 1, kept", pruned_kept)):
        rows.append([label, f"{statistics.median(t['epochs'] for t in trials):.0f}",
                     f"{statistics.median(t['kept'] for t in trials):.0f}",
                     *[f"{statistics.median(t[c] for t in trials):.2f}" for c in columns]])
    print(format_table(["trials (median of each column, s)", "epochs", "kept", *columns], rows))
    for label, complete, pruned in (("built anew", anew, pruned_anew), ("kept", kept, pruned_kept)):
        print(f"models {label}: fixed cost outside fit, complete trial (median) "
              f"{statistics.median(t['fixed'] for t in complete):.2f} s; a pruned trial's wall time (median) "
              f"{statistics.median(t['wall'] for t in pruned):.2f} s")
    on = statistics.median(t["phase1_epoch"] for t in kept)
    off = statistics.median(t["phase1_epoch"] for t in uncached)
    print(f"phase-1 epoch, steady state (median): uncached {off:.3f} s, cached {on:.3f} s -> {off / on:.1f}x cheaper")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6, help="measured trials of each kind")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured first trials (cache fill at each depth)")
    parser.add_argument("--weights", default="none", help="'none' (random init) or a weights file")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--smoke", action="store_true", help="tiny_resnet at 16x16, one trial of each kind")
    args = parser.parse_args()
    if args.smoke:
        args.backbone, args.image_size, args.trials, args.warmup = "tiny_resnet", 16, 1, 1
    run(args)


if __name__ == "__main__":
    main()
