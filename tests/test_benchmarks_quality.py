"""The search-quality benchmark's harness: its summary arithmetic, and a smoke run of every search."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, cli_env

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import quality_warm_start  # noqa: E402
import search_quality  # noqa: E402

NAMES = {"autofinetune", "keras-tuner hyperband", "keras-tuner random", "optuna+keras-pruning", "ray-asha"}


def _run(*trials: tuple[float, float], final_val: float | None = None) -> dict:
    listed = [{"id": i, "end_s": end, "val": val} for i, (end, val) in enumerate(trials)]
    return {"trials": listed, "final_val": final_val, "final_test": None, "wall_s": 100.0}


def test_time_to_target_is_when_the_best_so_far_first_reaches_it_within_the_budget():
    run = _run((10, 0.5), (20, 0.7), (30, 0.9), (120, 0.95))
    assert search_quality.time_to_reach(run["trials"], 0.7, 100) == 20
    assert search_quality.time_to_reach(run["trials"], 0.8, 100) == 30
    assert math.isinf(search_quality.time_to_reach(run["trials"], 0.95, 100))  # only after the budget
    assert search_quality.best_so_far(run["trials"], 25) == 0.7
    assert search_quality.best_so_far(run["trials"], 5) is None


def test_summary_measures_each_seed_against_that_seeds_hyperband_result():
    runs = {
        "keras-tuner hyperband": [_run((50, 0.8), final_val=0.8), _run((60, 0.6), final_val=0.6)],
        "autofinetune": [_run((10, 0.85), final_val=0.85), _run((5, 0.5), (40, 0.65), final_val=0.65)],
        "ray-asha": [_run((30, 0.7), final_val=0.7), _run((30, 0.5), final_val=0.5)],
    }
    summary = search_quality.summarise(runs, budget_s=100)
    assert summary["target"] == "keras-tuner hyperband"
    assert summary["searches"]["autofinetune"]["time_to_target_s"] == pytest.approx(25)  # median of 10 and 40
    assert summary["searches"]["ray-asha"]["time_to_target_s"] is None  # never reached in either seed
    assert summary["searches"]["autofinetune"]["final_val"] == pytest.approx(0.75)


def test_warm_start_is_measured_by_when_the_warm_study_reaches_that_seeds_cold_final_best():
    cold = [_run((10, 0.6), (80, 0.8), final_val=0.8), _run((30, 0.7), final_val=0.7), _run((20, 0.9), final_val=0.9)]
    warm = [_run((20, 0.85), final_val=0.85), _run((10, 0.5), (60, 0.7), final_val=0.7), _run((50, 0.8), final_val=0.8)]
    rows = quality_warm_start.warm_start_rows(cold, warm, budget_s=100)
    assert [(row["cold_s"], row["warm_s"]) for row in rows[:3]] == [(80, 20), (30, 60), (20, None)]
    assert [row["warm_fraction"] for row in rows[:3]] == [0.2, 0.6, None]  # wall 100 s; seed 2 never got there
    median = rows[3]
    assert median["seed"] == "median"
    # The seed that never reached the target counts as the slowest, not as missing.
    assert (median["warm_s"], median["warm_fraction"], median["cold_val"]) == (60, 0.6, 0.8)
    assert quality_warm_start.warm_start_line(rows[2])[4] == "-"


def test_autofinetunes_best_is_its_final_choice_among_the_trials_that_ended_within_the_budget():
    import optuna

    from autofinetune.store.attributes import SELECTION_SCORE_ATTR

    import quality_searches

    def study_of(*scores: float | None):
        study = optuna.create_study(direction="maximize")
        for val, selection in zip((0.90, 0.95, 0.80, 0.99), scores):
            attrs = {} if selection is None else {SELECTION_SCORE_ATTR: {"value": selection, "among": 3}}
            study.add_trial(optuna.trial.create_trial(value=val, user_attrs=attrs))
        return study

    # Trial 3 (val 0.99) ended after the budget: it counts for neither choice.
    trials = [{"id": i, "end_s": end, "val": val} for i, (end, val) in enumerate([(10, 0.90), (20, 0.95), (30, 0.80), (120, 0.99)])]
    assert quality_searches.final_choice_counted(study_of(None, None, None, None), trials, 100)["id"] == 1
    assert quality_searches.best_counted(trials, 100)["id"] == 1, "the same as without a selection split"
    assert quality_searches.final_choice_counted(study_of(0.7, 0.6, 0.8, 0.9), trials, 100)["id"] == 2
    assert quality_searches.final_choice_counted(study_of(None, None, None, None), trials, 5) is None


def test_the_final_choice_table_counts_only_the_runs_where_it_chose_another_trial_with_both_models(tmp_path: Path):
    import quality_final_choice

    def run(best: int, best_test: float | None, chosen: int, chosen_test: float | None) -> dict:
        return {"task": "shapes", "seed": "seed0", "search": "autofinetune--selection-0.1-", "trials": 5,
                "best_by_val": best, "best_by_val_test": best_test, "chosen": chosen, "chosen_test": chosen_test}

    rows = quality_final_choice.table_rows([
        run(1, 0.70, 1, 0.70), run(1, 0.70, 2, 0.75), run(3, 0.80, 4, 0.78), run(3, 0.80, 5, 0.84),
        run(1, None, 2, 0.9),  # the best trial's model was dropped: not counted
    ])
    assert rows[1][-1] == "+0.050" and rows[2][-1] == "-0.020" and rows[4][-1] == "no kept model"
    assert rows[-1][2] == "another trial in 3 of 4" and rows[-1][6] == "better 2, worse 1"
    assert rows[-1][-1] == "median +0.040"
    with pytest.raises(SystemExit, match="no study .* scored its trials on a selection split"):
        quality_final_choice.main([str(tmp_path)])


def test_a_variant_is_a_launch_whose_spec_sets_the_keys_it_names(tmp_path: Path):
    import tomllib

    import quality_spec
    from autofinetune.data.sources import synthetic_images, write_image_folder
    from autofinetune.spec.loading import parse_spec

    folder = write_image_folder(tmp_path / "images", *synthetic_images(8, 2, 3, seed=0))

    name, overrides = search_quality.parse_variant(
        ["fewer-startup", "search.sampler_options.n_startup_trials=4", "search.pruner=median", "schedule.phase2_epochs=0",
         "launch.workers=2", "launch.skip_unreadable=true"])
    assert name == "autofinetune [fewer-startup]"
    assert overrides == {"search": {"sampler_options": {"n_startup_trials": 4}, "pruner": "median"},
                         "schedule": {"phase2_epochs": 0}, "launch": {"workers": 2, "skip_unreadable": True}}
    config = {"seed": 1, "trainval_dir": str(folder), "image_size": 32, "validation_split": 0.2, "batch_size": 16,
              "backbone": "tiny_resnet", "weights": "none", "phase1_epochs": 2, "phase2_epochs": 3,
              "spec_overrides": overrides}
    spec = parse_spec(tomllib.loads(quality_spec.spec_toml(config)))
    assert spec.search.sampler_options == {"n_startup_trials": 4} and spec.search.pruner == "median"
    assert (spec.schedule.phase1_epochs, spec.schedule.phase2_epochs, spec.data.batch_size) == (2, 0, 16)
    assert spec.search.n_trials == 100000  # the wall-clock budget ends the search
    # launch.* keys are the command line's options, not the spec's.
    assert quality_spec.launch_options(config) == ["--workers", "2", "--skip-unreadable"]
    with pytest.raises(SystemExit, match="'n_startup_trials=4' is not SECTION.KEY=VALUE"):
        search_quality.parse_variant(["bad", "n_startup_trials=4"])


def test_the_searches_a_run_leaves_out_come_from_an_earlier_run_with_the_same_settings(tmp_path: Path):
    settings = {"budget_s": 150.0, "phase1_epochs": 2, "trainval": 600}
    hyperband = [_run((50, v), final_val=v) for v in (0.6, 0.7, 0.8)]
    random_search = [_run((40, 0.5), final_val=0.5)] * 3
    earlier = {"settings": {**settings, "seeds": 3},
               "runs": {"keras-tuner hyperband": hyperband, "keras-tuner random": random_search,
                        "autofinetune": [_run((5, 0.9), final_val=0.9)] * 3}}
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps(earlier))
    added = search_quality.reference_runs(path, settings, seeds=2, running=["autofinetune"])
    assert added == {"keras-tuner hyperband": hyperband[:2], "keras-tuner random": random_search[:2]}
    with pytest.raises(SystemExit, match="budget_s 150.0 there, 90.0 here"):
        search_quality.reference_runs(path, {**settings, "budget_s": 90.0}, seeds=2, running=["autofinetune"])
    with pytest.raises(SystemExit, match="3 seed"):
        search_quality.reference_runs(path, settings, seeds=4, running=["autofinetune"])
    without_target = tmp_path / "without.json"
    without_target.write_text(json.dumps({**earlier, "runs": {"keras-tuner random": random_search}}))
    with pytest.raises(SystemExit, match="no 'keras-tuner hyperband' runs"):
        search_quality.reference_runs(without_target, settings, seeds=2, running=["autofinetune"])
    # The earlier Hyperband's finals are this run's targets.
    runs = {**added, "autofinetune": [_run((10, 0.65), final_val=0.65), _run((30, 0.75), final_val=0.75)]}
    summary = search_quality.summarise(runs, budget_s=100)
    assert summary["searches"]["autofinetune"]["time_to_target_s"] == pytest.approx(20)  # median of 10 and 30
    assert summary["searches"]["keras-tuner random"]["time_to_target_s"] is None


@pytest.mark.slow
def test_smoke_run_of_every_search_writes_the_summary_and_the_plot(tmp_path: Path):
    from autofinetune.data.sources import synthetic_images, write_image_folder

    folder = write_image_folder(tmp_path / "images", *synthetic_images(16, 3, 12, seed=0))
    out, plot = tmp_path / "quality.json", tmp_path / "quality.png"
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "search_quality.py"), "--smoke", "--data", str(folder),
         "--image-size", "16", "--workdir", str(tmp_path / "runs"), "--json", str(out), "--plot", str(plot)],
        env=cli_env(), capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["target"] == "keras-tuner hyperband"
    assert set(summary["searches"]) == NAMES
    for name, entry in summary["searches"].items():
        assert {"final_val", "final_test", "time_to_target_s", "wall_s"} <= set(entry), name
        for key in ("final_val", "final_test", "time_to_target_s"):
            assert entry[key] is None or isinstance(entry[key], float), (name, key)
        assert entry["wall_s"] > 0
    # autofinetune's best trial went through `autofinetune export` and was scored on the test images.
    assert 0.0 <= summary["searches"]["autofinetune"]["final_test"] <= 1.0
    assert all(len(runs) == 1 for runs in summary["runs"].values())
    assert plot.stat().st_size > 1000
    assert "best-so-far validation accuracy against wall time" in completed.stdout


def test_fixed_cost_benchmark_splits_each_trial_into_epochs_and_fixed_cost():
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "trial_fixed_cost.py"), "--smoke"],
        env=cli_env(), capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    lines = completed.stdout.splitlines()
    header = next(line for line in lines if line.startswith("trials (median"))
    columns = header.split()[-11:]
    assert columns == ["epochs", "kept", "wall", "fit", "fixed", "build", "cache", "compile", "trace", "save", "other"]

    def row(label: str) -> dict[str, float]:
        return dict(zip(columns, map(float, next(l for l in lines if l.startswith(label)).split()[-11:])))

    anew, kept = row("complete, models built anew"), row("complete, models kept")
    pruned_anew, pruned_kept = row("pruned after epoch 1, built anew"), row("pruned after epoch 1, kept")
    assert anew["epochs"] == kept["epochs"] == 6 and pruned_kept["epochs"] == 1  # 3+3 epochs; pruned after the first
    # The trial after the first of its shapes trains both phases on the models it kept.
    assert (anew["kept"], kept["kept"], pruned_anew["kept"], pruned_kept["kept"]) == (0, 2, 0, 1)
    for complete in (anew, kept):
        assert complete["fit"] > 0 and complete["wall"] == pytest.approx(complete["fit"] + complete["fixed"], abs=0.02)
    assert pruned_kept["wall"] < kept["wall"]
    ratio = next(line for line in lines if line.startswith("phase-1 epoch, steady state"))
    assert float(ratio.split("->")[1].split("x")[0]) > 0


def test_range_scan_bins_cover_each_scanned_value_once():
    import search_ranges

    rng = __import__("numpy").random.default_rng(0)
    for name, space in search_ranges.SCAN_SPACE.items():
        bins = search_ranges.bins_of(name, space)
        if isinstance(space, dict) and space.get("log"):
            values = 10 ** rng.uniform(math.log10(space["low"]), math.log10(space["high"]), 200)
            values = [*values, space["low"], space["high"]]
        elif isinstance(space, dict) and isinstance(space["low"], float):
            values = [*rng.uniform(space["low"], space["high"], 200), space["low"], space["high"]]
        else:
            values = list(space) if isinstance(space, list) else list(range(space["low"], space["high"] + 1))
        for value in values:
            hits = [label for i, (label, low, high) in enumerate(bins)
                    if search_ranges.in_bin(value, low, high, i == len(bins) - 1)]
            assert len(hits) == 1, (name, value, hits)
    assert [label for label, *_ in search_ranges.bins_of("phase1_lr", {"low": 1e-5, "high": 1e-1, "log": True})][:2] \
        == ["1e-05-3e-05", "3e-05-1e-04"]


def test_range_scan_counts_the_top_quarter_in_the_bins_it_falls_in():
    import search_ranges

    trials = [{"params": {"unfreeze_depth": depth}, "val": val}
              for depth, val in [(0, 0.2), (0, 0.3), (2, 0.9), (2, 0.8), (4, 0.5), (4, 0.4), (6, 0.1), (6, 0.6)]]
    header, rows = search_ranges.parameter_table("unfreeze_depth", trials)
    by_depth = {row[0]: row for row in rows}
    assert header[-1] == "in top 25%"
    assert by_depth["2"][1:] == ["2", "0.850", "0.900", "2"]  # the two best of eight are both depth 2
    assert by_depth["1"][1:] == ["0", "-", "-", "0"]


def test_the_range_scan_runs_on_a_tuning_task_and_refuses_an_evaluation_task(capsys):
    import search_ranges

    assert search_ranges.parse_args(["--task", "textures"]).task == "textures"
    with pytest.raises(SystemExit):
        search_ranges.parse_args(["--task", "shapes"])
    assert "--task shapes: an evaluation task; defaults are chosen on the tuning tasks only" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_run_of_the_range_scan_prints_each_parameter_and_the_top_quarter(tmp_path: Path):
    from autofinetune.data.sources import synthetic_images, write_image_folder

    folder = write_image_folder(tmp_path / "images", *synthetic_images(16, 3, 12, seed=0))
    out = tmp_path / "ranges.json"
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "search_ranges.py"), "--smoke", "--data", str(folder),
         "--image-size", "16", "--workdir", str(tmp_path / "run"), "--json", str(out)],
        env=cli_env(), capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    scan = json.loads(out.read_text())
    assert len(scan["trials"]) == 6  # no pruner: every trial completes
    for name in ("head_units", "unfreeze_depth", "phase1_lr", "phase2_lr"):
        assert any(line.split()[:1] == [name] for line in completed.stdout.splitlines()), name
        assert len({trial["params"][name] for trial in scan["trials"]}) > 1, name  # sampled, not fixed
    assert "the top quarter of trials (1 of 6" in completed.stdout


# --- the suite ---------------------------------------------------------------------------------


def test_each_suite_task_has_its_classes_and_counts_is_seeded_and_beats_chance_by_a_margin():
    import numpy as np
    import tasks

    assert {task.role for task in tasks.TASKS.values()} == {"tuning", "evaluation"}
    assert tasks.TASKS["digits"].role == "tuning"
    for name, task in tasks.TASKS.items():
        x, y, names = task.generator(16, 0)
        assert x.dtype == np.uint8 and x.shape == (len(y), 16, 16, 3), name
        assert len(names) == 10 and sorted(set(y.tolist())) == list(range(10)), name
        counts = np.bincount(y)
        # search_quality's split: 20% held back for test, then 20% of the rest for validation.
        validation = 0.2 * (len(y) - sum(round(0.2 * c) for c in counts))
        assert validation > 200, (name, validation)  # one image is under 0.5% of the validation split
        again, _, _ = task.generator(16, 0)
        assert np.array_equal(x, again), name  # deterministic for a seed
        if name != "digits":  # the bundled digits are a fixed set
            other, _, _ = task.generator(16, 1)
            assert not np.array_equal(x, other), name
            assert counts.tolist() == [tasks.PER_CLASS] * 10, name
        # Not noise: a linear probe on fixed features beats chance (0.1) by a margin.
        assert tasks.probe_accuracy(x, y) > 0.3, name


def test_a_task_folder_is_rendered_once_per_task_size_and_seed(tmp_path: Path):
    import tasks

    folder = tasks.task_folder("textures", 16, 3, cache_dir=tmp_path)
    assert folder.name == "task-textures-16px-seed3"
    classes = sorted(p.name for p in folder.iterdir())
    assert classes == sorted(tasks.TEXTURES)
    assert len(list((folder / "dots").glob("*.png"))) == tasks.PER_CLASS
    stamp = (folder / "dots").stat().st_mtime_ns
    assert tasks.task_folder("textures", 16, 3, cache_dir=tmp_path) == folder
    assert (folder / "dots").stat().st_mtime_ns == stamp  # cached, not rendered again


def test_the_suite_reads_each_tasks_anchors_from_its_own_reference_file(tmp_path: Path, monkeypatch):
    import quality_suite

    monkeypatch.setattr(quality_suite, "task_folder", lambda name, size, seed: tmp_path / name)
    args = search_quality.parse_args(["--suite", "--reference", str(tmp_path / "ref"), "--json", str(tmp_path / "out")])
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "digits.json").write_text("{}")
    one = quality_suite.task_args(args, "digits", tmp_path / "runs")
    assert (one.task, one.reference, one.json) == ("digits", tmp_path / "ref" / "digits.json", tmp_path / "out" / "digits.json")
    with pytest.raises(SystemExit, match="no shapes.json there"):
        quality_suite.task_args(args, "shapes", tmp_path / "runs")
    with pytest.raises(SystemExit):
        search_quality.parse_args(["--suite", "--data", str(tmp_path)])  # the suite renders its own data


def test_warm_start_names_each_other_tasks_study_of_the_same_seed_and_refuses_a_missing_one(tmp_path: Path):
    for task in ("digits", "glyphs", "shapes"):
        for seed in (0, 1):
            folder = search_quality.run_folder(tmp_path / "earlier" / task, seed, "autofinetune")
            folder.mkdir(parents=True)
            (folder / "study.db").touch()
    sources = quality_warm_start.warm_start_sources(tmp_path / "earlier", "shapes", seeds=2)
    database = (tmp_path / "earlier" / "glyphs" / "seed1" / "autofinetune" / "study.db").resolve()
    assert len(sources) == 2 and len(sources[1]) == 2  # digits and glyphs, not shapes itself
    assert sources[1][1] == f"quality-seed1@sqlite:///{database}"
    with pytest.raises(SystemExit, match=r"seed2.*is missing \(task 'digits', seed 2"):
        quality_warm_start.warm_start_sources(tmp_path / "earlier", "shapes", seeds=3)
    with pytest.raises(SystemExit, match="no task folder other than 'shapes'"):
        quality_warm_start.warm_start_sources(tmp_path / "earlier" / "digits", "shapes", seeds=1)
    with pytest.raises(SystemExit):  # the cold study it is compared with must run too
        search_quality.parse_args(["--warm-start-from", str(tmp_path), "--searches", "ray-asha"])


@pytest.mark.slow
def test_smoke_run_of_the_suite_runs_each_task_prints_one_table_and_warm_starts_from_an_earlier_suite(tmp_path: Path):
    def suite(*args: str) -> str:
        # HOME in tmp_path: the tasks are rendered into this test's own cache, not the user's.
        completed = subprocess.run(
            [sys.executable, str(REPO_ROOT / "benchmarks" / "search_quality.py"), "--suite", "--smoke",
             "--searches", "autofinetune", "--image-size", "16", *args],
            env={**cli_env(), "HOME": str(tmp_path / "home")}, capture_output=True, text=True, timeout=900,
        )
        assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
        return completed.stdout

    out = tmp_path / "out"
    printed = suite("--tasks", "digits", "shapes", "--workdir", str(tmp_path / "runs"), "--json", str(out))
    summary = json.loads((out / "suite.json").read_text())
    assert list(summary["tasks"]) == ["digits", "shapes"]
    assert summary["tasks"]["shapes"]["role"] == "evaluation" and summary["tasks"]["shapes"]["settings"]["task"] == "shapes"
    for name in ("digits", "shapes"):
        assert 0.0 <= json.loads((out / f"{name}.json").read_text())["searches"]["autofinetune"]["final_test"] <= 1.0
    table = printed.split("suite: final best per task")[1].splitlines()
    assert any(line.split()[:3] == ["shapes", "evaluation", "autofinetune"] for line in table)

    # The earlier suite's digits study warm-starts shapes, beside a cold study.
    printed = suite("--tasks", "shapes", "--warm-start-from", str(tmp_path / "runs"),
                    "--workdir", str(tmp_path / "warm"), "--json", str(tmp_path / "warm-out"))
    document = json.loads((tmp_path / "warm-out" / "shapes.json").read_text())
    assert set(document["runs"]) == {"autofinetune", quality_warm_start.WARM_START}
    assert document["variants"][quality_warm_start.WARM_START]["search"]["warm_start"][0][0].startswith("quality-seed0@")
    assert [row["seed"] for row in document["warm_start"]] == [0, "median"]
    assert "warm start" in printed.split("suite: final best per task")[1]
    import optuna

    from autofinetune.store.study import spec_from_study

    digits_db = (tmp_path / "runs" / "digits" / "seed0" / "autofinetune" / "study.db").resolve()
    warm_db = search_quality.run_folder(tmp_path / "warm" / "shapes", 0, quality_warm_start.WARM_START) / "study.db"
    stored = spec_from_study(optuna.load_study(study_name="quality-seed0", storage=f"sqlite:///{warm_db}"))
    assert [str(reference) for reference in stored.search.warm_start] == [f"quality-seed0@sqlite:///{digits_db}"]


def test_the_committed_backbone_parts_are_whole():
    import weights_parts

    parts_dir = weights_parts.COMMITTED / "resnet50_glyphs_32"
    parts = weights_parts.checked_parts(parts_dir)  # every part's SHA-256 as SHA256SUMS names it
    assert [p.name for p in parts] == sorted(p.name for p in parts_dir.glob("*.part[0-9][0-9]"))
    assert all(p.stat().st_size <= weights_parts.PART_BYTES for p in parts)


def test_packed_weights_come_back_within_float16_rounding_and_a_damaged_part_is_refused(tmp_path: Path):
    import keras
    import weights_parts

    from autofinetune.trial.backbones import build_backbone

    keras.utils.set_random_seed(0)
    source = tmp_path / "resnet50_glyphs_32.weights.h5"
    build_backbone("resnet50", image_size=32, weights=None).save_weights(str(source))
    parts = weights_parts.pack(source, tmp_path / "parts", 32)
    assert len(parts) > 1  # 47 MB of float16 in parts of at most 15 MB

    drift = weights_parts.unpack(tmp_path / "parts", tmp_path / "rebuilt.weights.h5")
    assert drift < 1e-2
    rebuilt = build_backbone("resnet50", image_size=32, weights=str(tmp_path / "rebuilt.weights.h5"))
    original = build_backbone("resnet50", image_size=32, weights=str(source))
    for got, want in zip(rebuilt.get_weights(), original.get_weights()):
        assert abs(got - want).max() <= 1e-3 * max(1.0, abs(want).max())

    damaged = bytearray(parts[1].read_bytes())
    damaged[100] ^= 0xFF
    parts[1].write_bytes(bytes(damaged))
    with pytest.raises(SystemExit, match=rf"{parts[1].name} has SHA-256 [0-9a-f]{{64}}; .*SHA256SUMS says"):
        weights_parts.unpack(tmp_path / "parts", tmp_path / "again.weights.h5")
    assert not (tmp_path / "again.weights.h5").exists()
