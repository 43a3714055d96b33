"""The final choice apart from the images it holds back: test accuracy of the best trial by
validation and of the final choice, in the same study.

A ``search_quality.py`` run with ``--variant LABEL data.selection_split=F`` and ``--workdir DIR``
keeps each search's study and its best trials' models in ``DIR``. A variant's final test score
mixes two effects: the final choice (``data.selection_split``) and the smaller training split
it leaves. For every such study in ``DIR``, this scores the kept models of its best
``objective.final_choice_among`` trials by validation on the task's held-back test images, and
prints, per run, the test accuracy of the best trial by validation and of the final choice:
the choice's own effect, both trials trained on the same images.

    python benchmarks/quality_final_choice.py DIR [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # quality_searches, beside this file

from autofinetune.viewing.report import format_table  # noqa: E402

#: Every autofinetune study of a suite's workdir (``TASK/seedN/SEARCH/study.db``).
STUDIES = "*/seed*/*/study.db"

HEADER = ("task", "seed", "search", "trials", "best by val", "its test", "final choice", "its test", "difference")


def load(study_file: Path):
    import optuna

    url = f"sqlite:///{study_file}"
    return optuna.load_study(study_name=optuna.get_all_study_names(url)[0], storage=url)


def made_a_final_choice(study) -> bool:
    """Whether the study's trials were scored on a selection split."""
    from autofinetune.store.attributes import SELECTION_SCORE_ATTR

    return any(SELECTION_SCORE_ATTR in trial.user_attrs for trial in study.get_trials(deepcopy=False))


def score_run(study_file: Path) -> dict:
    """The best trial by validation and the final choice of one study, scored on its task's test images."""
    from autofinetune.errors import ConfigError
    from autofinetune.export.exporter import load_kept_model
    from autofinetune.store.artifacts import open_artifact_store
    from autofinetune.store.attributes import SELECTION_SCORE_ATTR, STUDY_CLASSES_ATTR
    from quality_searches import best_counted, final_choice_counted, load_test, ranked_counted

    study = load(study_file)
    config = json.loads((study_file.parent / "config.json").read_text())
    x_test, y_test, names = load_test(config)
    classes = list(study.user_attrs[STUDY_CLASSES_ATTR])
    truth = np.array([classes.index(names[label]) for label in y_test])
    # Among the trials the benchmark counted (those that ended within the budget), as it chose.
    trials = json.loads((study_file.parent / "result.json").read_text())["trials"]
    best = study.trials[best_counted(trials, config["budget_s"])["id"]]
    chosen = study.trials[final_choice_counted(study, trials, config["budget_s"])["id"]]
    store = open_artifact_store(f"{study_file}.artifacts")

    def test_accuracy(trial) -> float | None:
        try:
            model = load_kept_model(trial, store)
        except ConfigError:
            return None  # its model was dropped for a better trial that ended after the budget
        predicted = np.argmax(model.predict(x_test.astype("float32"), verbose=0), axis=1)
        return float(np.mean(predicted == truth))

    ranked = ranked_counted(trials, config["budget_s"])
    best_test = test_accuracy(best)
    return {
        "task": study_file.parents[2].name, "seed": study_file.parents[1].name, "search": study_file.parent.name,
        "trials": len(ranked), "best_by_val": best.number, "best_by_val_test": best_test,
        "chosen": chosen.number, "chosen_test": best_test if chosen.number == best.number else test_accuracy(chosen),
        "best": [{"trial": t["id"], "val": t["val"],
                  "selection": study.trials[t["id"]].user_attrs.get(SELECTION_SCORE_ATTR, {}).get("value")}
                 for t in ranked[:3]],
    }


def table_rows(runs: list[dict]) -> list[tuple[str, ...]]:
    """One row per run, then how often the choice differed and its median effect."""
    def cell(value: float | None, form: str) -> str:
        return "-" if value is None else format(value, form)

    measured = [run for run in runs if run["chosen_test"] is not None and run["best_by_val_test"] is not None]
    rows = [
        (run["task"], run["seed"], run["search"], str(run["trials"]), f"#{run['best_by_val']}",
         cell(run["best_by_val_test"], ".3f"), f"#{run['chosen']}", cell(run["chosen_test"], ".3f"),
         cell(run["chosen_test"] - run["best_by_val_test"], "+.3f") if run in measured else "no kept model")
        for run in runs
    ]
    differed = [run["chosen_test"] - run["best_by_val_test"] for run in measured if run["chosen"] != run["best_by_val"]]
    better = sum(1 for change in differed if change > 0)
    worse = sum(1 for change in differed if change < 0)
    median = f"{float(np.median(differed)):+.3f}" if differed else "-"
    rows.append(("all", "-", f"another trial in {len(differed)} of {len(measured)}", "-", "-", "-",
                 f"better {better}, worse {worse}", "-", f"median {median}"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path, help="an earlier search_quality.py --workdir")
    parser.add_argument("--json", type=Path, help="write every run's scores here")
    args = parser.parse_args(argv)
    studies = [path for path in sorted(args.workdir.glob(STUDIES)) if made_a_final_choice(load(path))]
    if not studies:
        raise SystemExit(f"{args.workdir}: no study ({STUDIES}) scored its trials on a selection split; run "
                         "search_quality.py with --variant LABEL data.selection_split=F --workdir DIR first")
    runs = [score_run(study) for study in studies]
    print("the final choice against the best trial by validation, in the same study (test accuracy)")
    print(format_table(HEADER, table_rows(runs)))
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
