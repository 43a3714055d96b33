"""The searches that ``search_quality.py`` compares, one per subprocess.

    python benchmarks/quality_searches.py NAME CONFIG.json

runs the search NAME on the train+validation folder that CONFIG names, within its wall-clock
budget, then evaluates the best trial's model (by validation accuracy) on the held-back test
images and writes ``CONFIG["result"]``: every trial's end time (from the search's own records)
and validation accuracy, the final best and its test accuracy.

The anchors (keras-tuner, Optuna + ``KerasPruningCallback``, Ray Tune ASHA + OptunaSearch) run
the seed tutorial's two-phase recipe with its bugs fixed, written as their tutorials write it:
preprocessing inside the model, the top-k residual blocks unfrozen by name with BatchNorm
frozen, ``learning_rate`` (not ``lr``), a recompile after ``trainable`` changes, and phase 2
continuing the epoch count. ``autofinetune`` runs ``autofinetune launch`` with its defaults and
is evaluated through ``autofinetune export``; its best trial is the one it names best, its final
choice where ``data.selection_split`` is set (:func:`final_choice_counted`).

Budget: no search starts a trial after ``budget_s`` (measured from when the harness started the
subprocess, so start-up counts); Ray Tune's ``time_budget_s`` also stops the trial running then.
``QUALITY_RAY_LOGS=1`` shows the output of Ray's trial workers (hidden otherwise).
Only trials that end within the budget count, and only trials that trained all their epochs
(keras-tuner's Hyperband rounds count: each is a finished trial with its own checkpoint).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow turns its oneDNN kernels on by default only on some CPUs; on an AVX2-only one (an AMD
# EPYC here) they train ResNet50 at 32x32 about 6x faster (95 against 16 images/s). Every search
# and the pretraining run with them: the benchmark compares searches, not kernels.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS.parent))  # this checkout's package

import numpy as np  # noqa: E402

from quality_spec import STUDY_FILE, launch_options, spec_dict, spec_toml  # noqa: E402

SEARCHES = ("keras-tuner hyperband", "keras-tuner random", "optuna+keras-pruning", "ray-asha", "autofinetune")
#: The seed recipe's search space (DESIGN.md), for every search.
HEAD_UNITS = [128, 256, 512, 1024]
UNFREEZE_DEPTH = (0, 6)
PHASE1_LR = (1e-4, 1e-2)
PHASE1_MOMENTUM = (0.0, 0.95)
PHASE2_LR = (1e-5, 1e-3)
PHASE2_MOMENTUM = (0.5, 0.99)


def load_split(config: dict):
    """Train and validation arrays exactly as autofinetune splits the same folder with the same seed."""
    from autofinetune.data.sources import load_data
    from autofinetune.spec import parse_spec

    data = load_data(parse_spec(spec_dict(config), base_dir=config["workdir"], origin="benchmark spec"))
    return data.x_train, data.y_train, data.x_val, data.y_val, list(data.class_names)


def load_test(config: dict):
    test = np.load(config["test_file"])
    return test["x"], test["y"], [str(name) for name in test["class_names"]]


def remaining(config: dict) -> float:
    """Seconds of the budget left (the budget started when the harness started this process)."""
    return max(0.0, config["t0"] + config["budget_s"] - time.time())


# --- the seed recipe, bugs fixed (shared by the anchors) --------------------------------------


def recipe_parts():
    """Model building and two-phase training as a tutorial reader writes them (Keras only)."""
    import keras
    from keras import layers, ops

    class CaffePreprocess(layers.Layer):
        """``resnet50.preprocess_input`` inside the model: RGB->BGR, ImageNet means, 0..255."""

        def call(self, inputs):
            x = ops.flip(ops.cast(inputs, "float32"), axis=-1)
            return x - ops.convert_to_tensor([103.939, 116.779, 123.68])

    def make_base(config: dict):
        weights = None if config["weights"] == "none" else config["weights"]
        size = config["image_size"]
        if config["backbone"] == "resnet50":
            return keras.applications.ResNet50(include_top=False, weights=weights, input_shape=(size, size, 3))
        from autofinetune.trial.backbones import build_backbone  # the tiny test backbone (--smoke)

        return build_backbone(config["backbone"], image_size=size, weights=weights)

    def build_model(params: dict, config: dict, num_classes: int):
        keras.utils.set_random_seed(config["seed"])
        size = config["image_size"]
        base = make_base(config)
        inputs = keras.Input((size, size, 3))
        x = CaffePreprocess()(inputs)
        x = base(x, training=False)  # BatchNorm stays in inference mode
        x = layers.GlobalAveragePooling2D()(x)
        x = layers.Dense(params["head_units"], activation="relu")(x)
        outputs = layers.Dense(num_classes, activation="softmax")(x)
        return keras.Model(inputs, outputs)

    def unfreeze_top_blocks(base, depth: int) -> None:
        blocks = []
        for layer in base.layers:
            block = "_".join(layer.name.split("_")[:2]) if "_block" in layer.name else None
            if block and block not in blocks:
                blocks.append(block)
        top = set(blocks[len(blocks) - depth:]) if depth else set()
        base.trainable = bool(top)
        for layer in base.layers:
            block = "_".join(layer.name.split("_")[:2])
            layer.trainable = block in top and not isinstance(layer, layers.BatchNormalization)

    def train_two_phase(model, params: dict, config: dict, x, y, *, validation_data, callbacks=(),
                        epochs: int | None = None, initial_epoch: int = 0) -> list[dict]:
        """Phase 1 (head, RMSprop) then phase 2 (top blocks, SGD); returns each epoch's logs."""
        e1, total = config["phase1_epochs"], epochs or config["phase1_epochs"] + config["phase2_epochs"]
        base = next(layer for layer in model.layers if isinstance(layer, keras.Model))
        logs: list[dict] = []
        keep = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, log: logs.append(dict(log or {})))
        common = dict(batch_size=config["batch_size"], validation_data=validation_data, verbose=0,
                      callbacks=[*callbacks, keep])
        loss = "sparse_categorical_crossentropy"
        if initial_epoch < e1:
            base.trainable = False
            model.compile(optimizer=keras.optimizers.RMSprop(learning_rate=params["phase1_lr"],
                                                             momentum=params["phase1_momentum"]),
                          loss=loss, metrics=["accuracy"])
            model.fit(x, y, epochs=min(total, e1), initial_epoch=initial_epoch, **common)
        if total > e1:
            unfreeze_top_blocks(base, params["unfreeze_depth"])
            model.compile(optimizer=keras.optimizers.SGD(learning_rate=params["phase2_lr"],
                                                         momentum=params["phase2_momentum"]),
                          loss=loss, metrics=["accuracy"])
            model.fit(x, y, epochs=total, initial_epoch=max(initial_epoch, e1), **common)
        return logs

    def test_accuracy(model, x_test, y_test) -> float:
        predicted = np.argmax(model.predict(x_test, batch_size=256, verbose=0), axis=1)
        return float(np.mean(predicted == y_test))

    return build_model, train_two_phase, test_accuracy


def ranked_counted(trials: list[dict], deadline_s: float) -> list[dict]:
    """The trials that ended within the budget with a validation accuracy, the best first (of
    two equal ones, the one that ended first)."""
    counted = [t for t in trials if t["end_s"] <= deadline_s and t["val"] is not None]
    return sorted(counted, key=lambda t: (-t["val"], t["end_s"]))


def best_counted(trials: list[dict], deadline_s: float) -> dict | None:
    """The trial with the best validation accuracy among those that ended within the budget."""
    ranked = ranked_counted(trials, deadline_s)
    return ranked[0] if ranked else None


# --- (a) keras-tuner -----------------------------------------------------------------------------


def run_keras_tuner(config: dict, *, tuner_kind: str) -> dict:
    import keras
    import keras_tuner as kt
    from keras_tuner.src.engine import trial as kt_trial

    build_model, train_two_phase, test_accuracy = recipe_parts()
    x_train, y_train, x_val, y_val, names = load_split(config)
    total_epochs = config["phase1_epochs"] + config["phase2_epochs"]

    class SeedRecipe(kt.HyperModel):
        def build(self, hp):
            params = {
                "head_units": hp.Choice("head_units", HEAD_UNITS),
                "unfreeze_depth": hp.Int("unfreeze_depth", *UNFREEZE_DEPTH),
                "phase1_lr": hp.Float("phase1_lr", *PHASE1_LR, sampling="log"),
                "phase1_momentum": hp.Float("phase1_momentum", *PHASE1_MOMENTUM),
                "phase2_lr": hp.Float("phase2_lr", *PHASE2_LR, sampling="log"),
                "phase2_momentum": hp.Float("phase2_momentum", *PHASE2_MOMENTUM),
            }
            return build_model(params, config, len(names))

        def fit(self, hp, model, x, y, validation_data=None, callbacks=None, epochs=None, initial_epoch=0, **kwargs):
            logs = train_two_phase(model, hp.values, config, x, y, validation_data=validation_data,
                                   callbacks=callbacks or [], epochs=epochs, initial_epoch=initial_epoch)
            return {"val_accuracy": max(log.get("val_accuracy", 0.0) for log in logs) if logs else 0.0}

    ended: dict[str, float] = {}
    started = {"count": 0}
    max_trials = config.get("max_trials") or 10**6
    tuner_class = kt.Hyperband if tuner_kind == "hyperband" else kt.RandomSearch

    class TimedTuner(tuner_class):
        """Records when each trial ends; starts no trial after the budget."""

        def on_trial_end(self, trial):
            super().on_trial_end(trial)
            ended[trial.trial_id] = time.time()

    options: dict[str, Any] = dict(objective="val_accuracy", seed=config["seed"], directory=config["run_dir"],
                                   project_name="kt", overwrite=True)
    if tuner_kind == "hyperband":
        tuner = TimedTuner(SeedRecipe(), max_epochs=total_epochs, factor=3, hyperband_iterations=10**6, **options)
    else:
        tuner = TimedTuner(SeedRecipe(), max_trials=max_trials, **options)
    create_trial = tuner.oracle.create_trial

    def create_trial_within_budget(tuner_id):
        if remaining(config) <= 0 or started["count"] >= max_trials:
            return kt_trial.Trial(tuner.oracle.get_space(), status=kt_trial.TrialStatus.STOPPED)
        started["count"] += 1
        return create_trial(tuner_id)

    tuner.oracle.create_trial = create_trial_within_budget
    kwargs = {} if tuner_kind == "hyperband" else {"epochs": total_epochs}
    tuner.search(x_train, y_train, validation_data=(x_val, y_val), verbose=0, **kwargs)
    wall_s = time.time() - config["t0"]
    trials = []
    for trial_id, trial in tuner.oracle.trials.items():
        if trial_id in ended and trial.status == kt_trial.TrialStatus.COMPLETED and trial.score is not None:
            trials.append({"id": trial_id, "end_s": ended[trial_id] - config["t0"], "val": float(trial.score)})
    best = best_counted(trials, config["budget_s"])
    test = None
    if best is not None:
        x_test, y_test, _ = load_test(config)
        keras.backend.clear_session()
        model = tuner.load_model(tuner.oracle.trials[best["id"]])
        test = test_accuracy(model, x_test, y_test)
    return finish(trials, best, test, wall_s)


# --- (b) Optuna + KerasPruningCallback -------------------------------------------------------------


def suggest(trial) -> dict:
    return {
        "head_units": trial.suggest_categorical("head_units", HEAD_UNITS),
        "unfreeze_depth": trial.suggest_int("unfreeze_depth", *UNFREEZE_DEPTH),
        "phase1_lr": trial.suggest_float("phase1_lr", *PHASE1_LR, log=True),
        "phase1_momentum": trial.suggest_float("phase1_momentum", *PHASE1_MOMENTUM),
        "phase2_lr": trial.suggest_float("phase2_lr", *PHASE2_LR, log=True),
        "phase2_momentum": trial.suggest_float("phase2_momentum", *PHASE2_MOMENTUM),
    }


def run_optuna(config: dict) -> dict:
    import keras
    import optuna
    from optuna_integration.keras import KerasPruningCallback

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    build_model, train_two_phase, test_accuracy = recipe_parts()
    x_train, y_train, x_val, y_val, names = load_split(config)
    models = Path(config["run_dir"])
    models.mkdir(parents=True, exist_ok=True)
    best_value = {"value": -1.0}

    def objective(trial):
        keras.backend.clear_session()
        params = suggest(trial)
        model = build_model(params, config, len(names))
        train_two_phase(model, params, config, x_train, y_train, validation_data=(x_val, y_val),
                        callbacks=[KerasPruningCallback(trial, "val_accuracy")])
        score = model.evaluate(x_val, y_val, verbose=0)
        if score[1] >= best_value["value"]:  # keep the best model so far, as users do
            best_value["value"] = score[1]
            model.save_weights(str(models / f"trial{trial.number}.weights.h5"))
        return score[1]

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=config["seed"]),
                                pruner=optuna.pruners.MedianPruner())
    study.optimize(objective, n_trials=config.get("max_trials"), timeout=remaining(config))
    wall_s = time.time() - config["t0"]
    trials = [{"id": t.number, "end_s": t.datetime_complete.timestamp() - config["t0"], "val": float(t.value)}
              for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = best_counted(trials, config["budget_s"])
    test = None
    if best is not None:
        x_test, y_test, _ = load_test(config)
        keras.backend.clear_session()
        model = build_model(study.trials[best["id"]].params, config, len(names))
        model.load_weights(str(models / f"trial{best['id']}.weights.h5"))
        test = test_accuracy(model, x_test, y_test)
    return finish(trials, best, test, wall_s)


# --- (c) Ray Tune ASHA + OptunaSearch ---------------------------------------------------------------


def ray_trainable(params: dict, *, config: dict, data: tuple) -> None:
    """One Ray Tune trial: the recipe, reporting validation accuracy after every epoch."""
    import keras
    from ray import tune

    build_model, train_two_phase, _ = recipe_parts()
    x_train, y_train, x_val, y_val, names = data
    total = config["phase1_epochs"] + config["phase2_epochs"]
    model = build_model(params, config, len(names))
    weights_file = Path(config["run_dir"]) / "models" / f"{tune.get_context().get_trial_id()}.weights.h5"

    class Report(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 == total:  # the trial's model, kept before its last report
                weights_file.parent.mkdir(parents=True, exist_ok=True)
                self.model.save_weights(str(weights_file))
            tune.report({"val_accuracy": float(logs["val_accuracy"]), "epoch": epoch + 1, "ended_at": time.time()})

    train_two_phase(model, params, config, x_train, y_train, validation_data=(x_val, y_val), callbacks=[Report()])


def run_ray(config: dict) -> dict:
    import keras
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    build_model, _, test_accuracy = recipe_parts()
    data = load_split(config)
    total = config["phase1_epochs"] + config["phase2_epochs"]
    path = os.pathsep.join([str(BENCHMARKS), str(BENCHMARKS.parent), os.environ.get("PYTHONPATH", "")])
    # Ray starts its workers at niceness 15 by default; the other searches train at normal
    # priority, and on a shared machine a niced trial would lose its CPU to everything else.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=bool(os.environ.get("QUALITY_RAY_LOGS")),
             runtime_env={"env_vars": {"PYTHONPATH": path, "TF_CPP_MIN_LOG_LEVEL": "2",
                                       "TF_ENABLE_ONEDNN_OPTS": os.environ["TF_ENABLE_ONEDNN_OPTS"]}})
    space = {
        "head_units": tune.choice(HEAD_UNITS),
        "unfreeze_depth": tune.randint(UNFREEZE_DEPTH[0], UNFREEZE_DEPTH[1] + 1),
        "phase1_lr": tune.loguniform(*PHASE1_LR),
        "phase1_momentum": tune.uniform(*PHASE1_MOMENTUM),
        "phase2_lr": tune.loguniform(*PHASE2_LR),
        "phase2_momentum": tune.uniform(*PHASE2_MOMENTUM),
    }
    trainable = tune.with_resources(tune.with_parameters(ray_trainable, config=config, data=data),
                                    {"cpu": os.cpu_count()})
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric="val_accuracy", mode="max",
            search_alg=OptunaSearch(seed=config["seed"]),
            scheduler=ASHAScheduler(max_t=total, grace_period=1, reduction_factor=3),
            num_samples=config.get("max_trials") or -1,
            time_budget_s=max(1.0, remaining(config)),
            max_concurrent_trials=1,
        ),
        run_config=tune.RunConfig(storage_path=str(Path(config["run_dir"]) / "ray"), name="asha", verbose=0),
    )
    results = tuner.fit()
    wall_s = time.time() - config["t0"]
    ray.shutdown()
    trials = []
    for result in results:
        metrics = result.metrics or {}
        if metrics.get("epoch") == total:  # stopped trials have no model to keep
            trials.append({"id": metrics["trial_id"], "end_s": metrics["ended_at"] - config["t0"],
                           "val": metrics["val_accuracy"], "params": result.config})
    best = best_counted(trials, config["budget_s"])
    test = None
    if best is not None:
        x_test, y_test, _ = load_test(config)
        keras.backend.clear_session()
        model = build_model(best["params"], config, len(data[4]))
        model.load_weights(str(Path(config["run_dir"]) / "models" / f"{best['id']}.weights.h5"))
        test = test_accuracy(model, x_test, y_test)
    for trial in trials:
        trial.pop("params")
    return finish(trials, best, test, wall_s)


# --- (d) autofinetune ----------------------------------------------------------------------------


def autofinetune_cli(*args: str, run_dir: Path, log) -> None:
    """``autofinetune ARGS`` in ``run_dir``, with a feature cache of its own that starts empty."""
    command = [sys.executable, "-c", "import sys; from autofinetune.cli import main; sys.argv[0] = 'autofinetune'; main()",
               *args]
    # This checkout's package, as in this process: not whichever one pip installed last.
    checkout = str(Path(__file__).resolve().parents[1])
    python_path = os.pathsep.join(p for p in (checkout, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, AUTOFINETUNE_CACHE_DIR=str(run_dir / "feature-cache"), PYTHONPATH=python_path)
    subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=run_dir, env=env)


def run_autofinetune(config: dict) -> dict:
    import optuna

    run_dir = Path(config["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_file = run_dir / "study.toml"
    spec_file.write_text(spec_toml(config))
    url = f"sqlite:///{run_dir / STUDY_FILE}"
    name = spec_dict(config)["name"]
    extra = ["--n-trials", str(config["max_trials"])] if config.get("max_trials") else []
    extra += launch_options(config)
    with open(run_dir / "launch.log", "w") as log:
        autofinetune_cli("launch", str(spec_file), "--storage", url, "--timeout", f"{remaining(config):.1f}",
                         *extra, run_dir=run_dir, log=log)
    wall_s = time.time() - config["t0"]
    study = optuna.load_study(study_name=name, storage=url)
    trials = [{"id": t.number, "end_s": t.datetime_complete.timestamp() - config["t0"], "val": float(t.value)}
              for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = final_choice_counted(study, trials, config["budget_s"])
    test = None
    if best is not None:
        from autofinetune.export.predict import load_exported_model

        out = run_dir / "export"
        with open(run_dir / "export.log", "w") as log:
            autofinetune_cli("export", name, "--trial", str(best["id"]), "--storage", url, "--out", str(out),
                             "--retrain", run_dir=run_dir, log=log)
        exported = load_exported_model(out)
        x_test, y_test, names = load_test(config)
        predicted = np.argmax(exported.predict(x_test.astype(np.float32)), axis=1)
        predicted_names = np.asarray(exported.classes)[predicted]
        test = float(np.mean(predicted_names == np.asarray(names)[y_test]))
    return finish(trials, best, test, wall_s)


def final_choice_counted(study, trials: list[dict], deadline_s: float) -> dict | None:
    """The trial autofinetune names best among those that ended within the budget: the best by
    validation, or with ``data.selection_split`` its final choice among the best few."""
    from autofinetune.store.study import final_choice

    ranked = ranked_counted(trials, deadline_s)
    if not ranked:
        return None
    chosen = final_choice([study.trials[t["id"]] for t in ranked], maximize=True).number
    return next(t for t in ranked if t["id"] == chosen)


# --- entry point -----------------------------------------------------------------------------------


def finish(trials: list[dict], best: dict | None, test: float | None, wall_s: float) -> dict:
    return {"trials": sorted(trials, key=lambda t: t["end_s"]), "best_trial": None if best is None else best["id"],
            "final_val": None if best is None else best["val"], "final_test": test, "wall_s": wall_s}


RUNNERS: dict[str, Callable[[dict], dict]] = {
    "keras-tuner hyperband": lambda config: run_keras_tuner(config, tuner_kind="hyperband"),
    "keras-tuner random": lambda config: run_keras_tuner(config, tuner_kind="random"),
    "optuna+keras-pruning": run_optuna,
    "ray-asha": run_ray,
    "autofinetune": run_autofinetune,
}


def main(argv: list[str]) -> int:
    name, config_file = argv
    config = json.loads(Path(config_file).read_text())
    result = RUNNERS[name](config)
    Path(config["result"]).write_text(json.dumps({"name": name, **result}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
