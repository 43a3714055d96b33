"""Benchmark: what the frozen-feature cache saves, against no cache and against keras-tuner.

Table 1 runs one fixed list of trials (fixed parameters, no pruning) three ways, interleaved
trial by trial so that the load of a shared machine falls on all three alike:

  (a) keras-tuner: the seed tutorial's recipe with its bugs fixed, as a keras-tuner
      ``HyperModel`` (preprocessing inside, top-k blocks by name, BatchNorm frozen, SGD with
      ``learning_rate``, recompile, ``initial_epoch``), played by an oracle that returns the list;
  (b) autofinetune's schedule with the cache off;
  (c) the same with the cache on (a fresh cache folder at the start).

Before anything runs it prints the speed-up predicted by counting residual-block passes
(frozen block: one forward pass per image; trained block: forward + backward = 3 passes).

Table 2 runs a real search on the same budget of epochs: keras-tuner's Hyperband against Optuna
(TPE sampler + Hyperband pruner) calling ``run_trial`` with the cache.

Usage (from the repository root):

    python benchmarks/feature_cache.py            # the full run, about an hour on 2 CPU cores
    python benchmarks/feature_cache.py --quick    # a smoke run, a few minutes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package

import numpy as np  # noqa: E402

from autofinetune.spec import parse_spec  # noqa: E402
from autofinetune.viewing.report import format_table  # noqa: E402

BLOCKS = 16  # residual blocks of ResNet50
TRAIN_PASS_COST = 3  # forward + backward of a trained block, in forward passes


# --- data, spec, trial list -------------------------------------------------------------------


def digits_folder(workdir: Path, image_size: int) -> Path:
    """The digits demo as an image folder (what ``autofinetune make-digits-folder`` writes)."""
    from autofinetune.data.sources import digits_images, write_image_folder

    folder = workdir / f"digits-{image_size}px"
    if not folder.exists():
        x, y, names = digits_images(image_size)
        write_image_folder(folder, x, y, names)
    return folder


def make_spec(folder: Path, *, image_size: int, per_class: int, max_depth: int, cache: bool, cache_dir: Path | None = None):
    return parse_spec(
        {
            "name": "feature-cache-benchmark",
            "seed": 0,
            "data": {
                "source": str(folder),
                "image_size": image_size,
                "validation_split": 0.2,
                "batch_size": 32,
                "max_images_per_class": per_class,
            },
            "backbone": {"name": "resnet50", "weights": "none"},
            "schedule": {"phase1_epochs": 3, "phase2_epochs": 3, "phase1_optimizer": "rmsprop"},
            "search": {"unfreeze_depth": {"low": 0, "high": max_depth}},
            "cache": {"enabled": cache, **({"dir": str(cache_dir)} if cache_dir else {})},
        },
        origin="benchmark spec",
    )


def fixed_trials(spec, n: int, max_depth: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` parameter sets drawn once from the spec's space; the depths cover 0..max_depth evenly."""
    from autofinetune.search.space import complete_params

    rng = np.random.default_rng(seed)
    depths = np.round(np.linspace(0, max_depth, n)).astype(int) if n > 1 else np.array([max_depth // 2])
    rng.shuffle(depths)

    def log_uniform(low: float, high: float) -> float:
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))

    trials = []
    for depth in depths:
        trials.append(
            complete_params(
                spec,
                {
                    "head_units": int(rng.choice([128, 256, 512, 1024])),
                    "unfreeze_depth": int(depth),
                    "phase1_lr": log_uniform(1e-4, 1e-2),
                    "phase1_momentum": float(rng.uniform(0.0, 0.95)),
                    "phase2_lr": log_uniform(1e-5, 1e-3),
                    "phase2_momentum": float(rng.uniform(0.5, 0.99)),
                },
            )
        )
    return trials


def predicted_block_passes(trials, *, n_train: int, n_val: int, e1: int, e2: int) -> tuple[int, int]:
    """(uncached, cached) cost of a trial list in forward block-passes, counted before running."""
    n = n_train + n_val
    # The first trial's one pass over the images stores the pooled features and the cut of
    # every depth the search allows (small at these sizes): no other trial runs the frozen part.
    uncached, cached = 0, (n * BLOCKS if trials else 0)
    for params in trials:
        k = int(params["unfreeze_depth"])
        trained = e2 * (TRAIN_PASS_COST * n_train * k + n_val * k)
        uncached += e1 * n * BLOCKS + e2 * n * (BLOCKS - k) + trained
        cached += trained
    return uncached, cached


# --- (a) keras-tuner --------------------------------------------------------------------------


def keras_tuner_parts():
    """The HyperModel and the fixed-list oracle (keras-tuner is imported only here)."""
    import keras
    import keras_tuner as kt
    from keras import layers

    from autofinetune.trial.backbones import block_of, residual_block_names
    from autofinetune.trial.model import caffe_preprocessing

    class SeedRecipe(kt.HyperModel):
        """The seed tutorial's two-phase recipe, its bugs fixed, as a keras-tuner HyperModel.

        ``fit`` honours ``epochs`` / ``initial_epoch`` (Hyperband resumes trials): epochs below
        ``phase1_epochs`` train the head on the frozen backbone, the rest fine-tune the top blocks.
        """

        def __init__(self, *, image_size: int, num_classes: int, e1: int, e2: int, batch_size: int, seed: int, max_depth: int):
            super().__init__(name="seed_recipe")
            self.image_size, self.num_classes = image_size, num_classes
            self.e1, self.e2, self.batch_size, self.seed, self.max_depth = e1, e2, batch_size, seed, max_depth
            self.epoch_log: list[dict[str, float]] = []  # one entry per epoch trained, all trials

        def declare_hyperparameters(self, hp):
            hp.Choice("head_units", [128, 256, 512, 1024])
            hp.Int("unfreeze_depth", 0, self.max_depth)
            hp.Float("phase1_lr", 1e-4, 1e-2, sampling="log")
            hp.Float("phase1_momentum", 0.0, 0.95)
            hp.Float("phase2_lr", 1e-5, 1e-3, sampling="log")
            hp.Float("phase2_momentum", 0.5, 0.99)

        def build(self, hp):
            keras.utils.set_random_seed(self.seed)
            size = self.image_size
            base = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(size, size, 3))
            inputs = keras.Input((size, size, 3))
            x = caffe_preprocessing()(inputs)  # fixed: preprocess_input inside the model
            x = base(x, training=False)  # fixed: BatchNorm in inference mode
            x = layers.GlobalAveragePooling2D()(x)
            x = layers.Dense(hp.get("head_units"), activation="relu")(x)
            outputs = layers.Dense(self.num_classes, activation="softmax")(x)
            return keras.Model(inputs, outputs)

        def fit(self, hp, model, x, y, *, validation_data, callbacks=(), epochs=None, initial_epoch=0, **kwargs):
            total = epochs or (self.e1 + self.e2)
            base = next(layer for layer in model.layers if isinstance(layer, keras.Model))
            log = self.epoch_log

            class Log(keras.callbacks.Callback):
                def on_epoch_begin(self, epoch, logs=None):
                    self.started = time.perf_counter()

                def on_epoch_end(self, epoch, logs=None):
                    log.append({"epoch": epoch + 1, "seconds": time.perf_counter() - self.started, **(logs or {})})

            seen_before = len(log)
            common = dict(batch_size=self.batch_size, validation_data=validation_data, verbose=0,
                          callbacks=[*callbacks, Log()])
            if initial_epoch < self.e1:
                base.trainable = False
                model.compile(
                    optimizer=keras.optimizers.RMSprop(hp.get("phase1_lr"), momentum=hp.get("phase1_momentum")),
                    loss="categorical_crossentropy", metrics=["accuracy"],
                )
                model.fit(x, y, epochs=min(total, self.e1), initial_epoch=initial_epoch, **common)
            if total > self.e1:
                # Fixed: unfreeze the top k residual blocks by name, BatchNorm stays frozen.
                names = residual_block_names(base)  # bottom to top
                depth = hp.get("unfreeze_depth")
                top = set(names[len(names) - depth:]) if depth else set()
                base.trainable = bool(top)
                for layer in base.layers:
                    layer.trainable = block_of(layer.name) in top and not isinstance(layer, layers.BatchNormalization)
                model.compile(  # fixed: learning_rate (not lr), and a recompile after trainable changes
                    optimizer=keras.optimizers.SGD(hp.get("phase2_lr"), momentum=hp.get("phase2_momentum")),
                    loss="categorical_crossentropy", metrics=["accuracy"],
                )
                # Fixed: phase 2 continues the epoch count.
                model.fit(x, y, epochs=total, initial_epoch=max(initial_epoch, self.e1), **common)
            values = [entry.get("val_accuracy", 0.0) for entry in log[seen_before:]]
            return {"val_accuracy": max(values) if values else 0.0}

    class FixedListOracle(kt.Oracle):
        """Plays a fixed list of trials; ``allowed`` says how many it may hand out so far."""

        def __init__(self, trials, **kwargs):
            super().__init__(objective=kt.Objective("val_accuracy", "max"), max_trials=len(trials), **kwargs)
            self.fixed = trials
            self.allowed = 0

        def populate_space(self, trial_id):
            index = len(self.trials)
            if index >= min(self.allowed, len(self.fixed)):
                return {"status": "STOPPED"}
            values = {name: self.fixed[index][name] for name in
                      ("head_units", "unfreeze_depth", "phase1_lr", "phase1_momentum", "phase2_lr", "phase2_momentum")}
            return {"status": "RUNNING", "values": values}

    return kt, SeedRecipe, FixedListOracle


# --- (b), (c) autofinetune ---------------------------------------------------------------------


class TimingReporter:
    """Remembers when each epoch ended (to time steady-state epochs) and its metrics."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.metrics: list[dict[str, float]] = []

    def report(self, step: int, metrics) -> None:
        self.ends.append(time.perf_counter())
        self.metrics.append(dict(metrics))


@dataclass
class WayTotals:
    """What one way spent on the trial list."""

    label: str
    wall: float = 0.0
    cpu: float = 0.0
    image_passes: int = 0
    best: float = 0.0
    phase1_seconds: list[float] = field(default_factory=list)  # per trial, model build to last epoch
    phase1_epoch: list[float] = field(default_factory=list)  # steady-state phase-1 epochs
    phase1_passes: list[int] = field(default_factory=list)  # per trial


def steady_phase1_epochs(ends: list[float], e1: int) -> list[float]:
    """Durations of phase-1 epochs 2..e1 (epoch 1 also pays for tracing the model)."""
    return [ends[i] - ends[i - 1] for i in range(1, min(e1, len(ends)))]


def run_table(args, workdir: Path, *, image_size: int, per_class: int, max_depth: int, n_trials: int, ways: str) -> dict:
    """Table 1 for one image size and depth range; returns its numbers."""
    import keras

    from autofinetune.data.sources import load_data
    from autofinetune.trial.features import FeatureCache
    from autofinetune.trial.schedule import run_trial
    from autofinetune.trial.session import TrialSession

    folder = digits_folder(workdir, image_size)
    cache_dir = workdir / f"cache-{image_size}px-0-{max_depth}"
    spec_off = make_spec(folder, image_size=image_size, per_class=per_class, max_depth=max_depth, cache=False)
    spec_on = make_spec(folder, image_size=image_size, per_class=per_class, max_depth=max_depth, cache=True, cache_dir=cache_dir)
    data = load_data(spec_on)
    n_train, n_val = len(data.x_train), len(data.x_val)
    e1, e2 = spec_on.schedule.phase1_epochs, spec_on.schedule.phase2_epochs
    trials = fixed_trials(spec_on, n_trials, max_depth)
    cost_off, cost_on = predicted_block_passes(trials, n_train=n_train, n_val=n_val, e1=e1, e2=e2)
    title = f"{image_size}x{image_size}, {n_trials} trials, unfreeze depths 0..{max_depth}"
    print(f"\n== {title}: {n_train} training + {n_val} validation images, {e1}+{e2} epochs", flush=True)
    print(f"predicted before measuring (block-passes): uncached {cost_off:,}, cached {cost_on:,}, "
          f"ratio {cost_off / cost_on:.2f}x", flush=True)
    shutil.rmtree(cache_dir, ignore_errors=True)
    cache = FeatureCache.from_spec(spec_on)
    session = TrialSession(cache)  # what an engine's worker keeps from trial to trial

    totals = {way: WayTotals(way) for way in ways}
    if "a" in ways:
        kt, SeedRecipe, FixedListOracle = keras_tuner_parts()
        hypermodel = SeedRecipe(image_size=image_size, num_classes=data.num_classes, e1=e1, e2=e2,
                                batch_size=spec_on.data.batch_size, seed=spec_on.seed, max_depth=max_depth)
        oracle = FixedListOracle(trials, seed=0)
        tuner = kt.Tuner(oracle=oracle, hypermodel=hypermodel, directory=str(workdir / "keras-tuner"),
                         project_name=f"fixed-{image_size}-{max_depth}", overwrite=True)
        y_train = keras.utils.to_categorical(data.y_train, data.num_classes)
        y_val = keras.utils.to_categorical(data.y_val, data.num_classes)

    for index, params in enumerate(trials):
        for way in ways:
            total = totals[way]
            wall, cpu = time.perf_counter(), time.process_time()
            if way == "a":
                before = len(hypermodel.epoch_log)
                oracle.allowed = index + 1
                tuner.search(data.x_train, y_train, validation_data=(data.x_val, y_val), verbose=0)
                epochs = hypermodel.epoch_log[before:]
                total.image_passes += len(epochs) * (n_train + n_val)
                total.best = max([total.best] + [e.get("val_accuracy", 0.0) for e in epochs])
                phase1 = [e for e in epochs if e["epoch"] <= e1]
                total.phase1_epoch += [e["seconds"] for e in phase1[1:]]
                total.phase1_passes.append(len(phase1) * (n_train + n_val))
                total.phase1_seconds.append(float("nan"))
            else:
                reporter = TimingReporter()
                result = run_trial(spec_on if way == "c" else spec_off, params, data, reporter=reporter,
                                   feature_cache=None if way == "c" else False, session=session)
                counters = result.extra["cache"]
                total.image_passes += counters["backbone_image_passes"]
                total.best = max(total.best, result.best_value or 0.0)
                total.phase1_seconds.append(result.phases[0].seconds)
                total.phase1_epoch += steady_phase1_epochs(reporter.ends, e1)
                first = result.phases[0]
                epochs1 = 1 if first.cached and "computed" in first.cache_note else 0 if first.cached else first.epochs_run
                total.phase1_passes.append(epochs1 * (n_train + n_val))
            total.wall += time.perf_counter() - wall
            total.cpu += time.process_time() - cpu
        line = ", ".join(f"{way}: {totals[way].wall:6.1f} s" for way in ways)
        print(f"  trial {index + 1:2d}/{n_trials} depth {params['unfreeze_depth']:2d}  cumulative wall {line}  "
              f"load {os.getloadavg()[0]:.1f}", flush=True)

    names = {"a": "(a) keras-tuner, seed recipe fixed", "b": "(b) autofinetune, cache off", "c": "(c) autofinetune, cache on"}
    rows = []
    for way in ways:
        t = totals[way]
        rows.append([
            names[way], round(t.wall, 1), round(t.cpu, 1), t.image_passes, round(t.best, 4),
            f"{totals['a'].wall / t.wall:.2f}x" if "a" in totals else "-",
            f"{totals['b'].wall / t.wall:.2f}x" if "b" in totals else "-",
            f"{cost_off / cost_on:.2f}x" if way == "c" else "1x",
            f"{np.median(t.phase1_epoch):.3f}" if t.phase1_epoch else "-",
        ])
    print()
    print(format_table(
        ["way", "wall s", "cpu s", "backbone image-passes", "best val_accuracy", "wall vs (a)", "wall vs (b)",
         "predicted vs uncached", "phase-1 epoch s"],
        rows,
    ))
    if "b" in totals and "c" in totals:
        b, c = totals["b"], totals["c"]
        epoch_ratio = np.median(b.phase1_epoch) / np.median(c.phase1_epoch)
        four = min(4, n_trials)
        print(f"phase-1 epoch, steady state (median): uncached {np.median(b.phase1_epoch):.3f} s, "
              f"cached {np.median(c.phase1_epoch):.3f} s -> {epoch_ratio:.1f}x cheaper")
        print(format_table(
            ["phase 1 over the first N trials", "uncached s", "cached s", "uncached image-passes", "cached image-passes"],
            [[f"N = {n}", round(sum(b.phase1_seconds[:n]), 1), round(sum(c.phase1_seconds[:n]), 1),
              sum(b.phase1_passes[:n]), sum(c.phase1_passes[:n])] for n in sorted({four, n_trials})],
        ))
    return {
        "title": title, "n_train": n_train, "n_val": n_val, "predicted_ratio": cost_off / cost_on,
        "ways": {way: {k: v for k, v in vars(t).items()} for way, t in totals.items()},
        "trials": trials,
    }


# --- table 2: a real search on the same epoch budget ---------------------------------------------


def run_search_table(args, workdir: Path, *, image_size: int, per_class: int) -> dict:
    import keras
    import optuna

    from autofinetune.data.sources import load_data
    from autofinetune.engines.optuna.worker import OptunaReporter
    from autofinetune.trial.features import FeatureCache
    from autofinetune.trial.schedule import run_trial
    from autofinetune.trial.session import TrialSession
    from autofinetune.search.space import suggest_params

    folder = digits_folder(workdir, image_size)
    cache_dir = workdir / f"cache-search-{image_size}px"
    spec = make_spec(folder, image_size=image_size, per_class=per_class, max_depth=6, cache=True, cache_dir=cache_dir)
    data = load_data(spec)
    e1, e2 = spec.schedule.phase1_epochs, spec.schedule.phase2_epochs
    max_epochs = e1 + e2
    print(f"\n== search, {image_size}x{image_size}: keras-tuner Hyperband vs Optuna TPE + Hyperband pruner + cache",
          flush=True)

    # keras-tuner's Hyperband sets the budget of epochs.
    kt, SeedRecipe, _ = keras_tuner_parts()
    hypermodel = SeedRecipe(image_size=image_size, num_classes=data.num_classes, e1=e1, e2=e2,
                            batch_size=spec.data.batch_size, seed=spec.seed, max_depth=6)
    tuner = kt.Hyperband(hypermodel=hypermodel, objective="val_accuracy", max_epochs=max_epochs, factor=3,
                         hyperband_iterations=args.hyperband_iterations, seed=0,
                         directory=str(workdir / "keras-tuner"), project_name=f"hyperband-{image_size}", overwrite=True)
    y_train = keras.utils.to_categorical(data.y_train, data.num_classes)
    y_val = keras.utils.to_categorical(data.y_val, data.num_classes)
    wall = time.perf_counter()
    tuner.search(data.x_train, y_train, validation_data=(data.x_val, y_val), verbose=0)
    kt_wall = time.perf_counter() - wall
    budget = len(hypermodel.epoch_log)
    kt_best = max(e.get("val_accuracy", 0.0) for e in hypermodel.epoch_log)
    kt_trials = len(tuner.oracle.trials)
    print(f"  keras-tuner: {kt_trials} trials, {budget} epochs, {kt_wall:.1f} s", flush=True)

    # Optuna on the same number of epochs.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    shutil.rmtree(cache_dir, ignore_errors=True)
    session = TrialSession(FeatureCache.from_spec(spec))
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=0),
        pruner=optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_epochs, reduction_factor=3),
    )
    used = {"epochs": 0, "best": 0.0, "passes": 0}

    def objective(trial):
        reporter = OptunaReporter(trial, spec.objective.metric)
        result = run_trial(spec, suggest_params(trial, spec), data, reporter=reporter, session=session)
        used["epochs"] += len(result.history)
        used["passes"] += result.extra["cache"]["backbone_image_passes"]
        used["best"] = max(used["best"], max(result.values("val_accuracy"), default=0.0))
        if result.state == "pruned":
            raise optuna.TrialPruned()
        return result.best_value

    def stop_at_budget(study, trial):
        if used["epochs"] >= budget:
            study.stop()

    wall = time.perf_counter()
    study.optimize(objective, callbacks=[stop_at_budget])
    optuna_wall = time.perf_counter() - wall
    states = [t.state.name for t in study.trials]
    print()
    print(format_table(
        ["search (same epoch budget)", "trials", "epochs", "backbone image-passes", "wall s", "best val_accuracy"],
        [
            ["keras-tuner Hyperband (no cache)", kt_trials, budget, budget * (len(data.x_train) + len(data.x_val)),
             round(kt_wall, 1), round(kt_best, 4)],
            [f"Optuna TPE + Hyperband pruner + cache ({states.count('PRUNED')} pruned)", len(study.trials),
             used["epochs"], used["passes"], round(optuna_wall, 1), round(used["best"], 4)],
        ],
    ))
    print(f"wall-time ratio: {kt_wall / optuna_wall:.2f}x", flush=True)
    return {"keras_tuner": {"trials": kt_trials, "epochs": budget, "wall": kt_wall, "best": kt_best},
            "optuna": {"trials": len(study.trials), "epochs": used["epochs"], "wall": optuna_wall, "best": used["best"],
                       "pruned": states.count("PRUNED")}}


# --- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: few images, 4 trials, 32x32 only")
    parser.add_argument("--trials", type=int, default=12, help="trials in the fixed list at 32x32 (default 12)")
    parser.add_argument("--images-per-class", type=int, default=30, help="digits per class at 32x32 (default 30)")
    parser.add_argument("--deep-images-per-class", type=int, default=10,
                        help="digits per class for unfreeze depths 0..16 (default 10)")
    parser.add_argument("--deep-ways", default="bc", help="ways run for depths 0..16 (default bc; abc adds keras-tuner)")
    parser.add_argument("--no-deep", action="store_true", help="skip the unfreeze-depths 0..16 table")
    parser.add_argument("--sizes", default="32,64", help="image sizes of table 1 (default 32,64)")
    parser.add_argument("--trials-64", type=int, default=6, help="trials in the fixed list at 64x64 (default 6)")
    parser.add_argument("--images-per-class-64", type=int, default=10, help="digits per class at 64x64 (default 10)")
    parser.add_argument("--no-search", action="store_true", help="skip table 2")
    parser.add_argument("--search-images-per-class", type=int, default=10, help="digits per class in table 2 (default 10)")
    parser.add_argument("--hyperband-iterations", type=int, default=1, help="keras-tuner Hyperband iterations (default 1)")
    parser.add_argument("--workdir", type=Path, help="where images, caches and keras-tuner files go (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.trials, args.images_per_class, args.sizes, args.no_deep = 4, 10, "32", True

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="autofinetune-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"workdir {workdir}; {os.cpu_count()} CPU cores; load average {os.getloadavg()[0]:.1f}", flush=True)
    started = time.perf_counter()
    results: dict[str, Any] = {"tables": []}
    for size in [int(s) for s in args.sizes.split(",") if s]:
        small = size <= 32
        results["tables"].append(run_table(
            args, workdir, image_size=size, max_depth=6, ways="abc",
            per_class=args.images_per_class if small else args.images_per_class_64,
            n_trials=args.trials if small else args.trials_64,
        ))
        if small and not args.no_deep:
            results["tables"].append(run_table(args, workdir, image_size=size, per_class=args.deep_images_per_class,
                                               max_depth=16, n_trials=args.trials, ways=args.deep_ways))
    if not args.no_search:
        results["search"] = run_search_table(args, workdir, image_size=32, per_class=args.search_images_per_class)
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
