"""Warm start in the study database: what a new study queues, the references refused, and the
source studies left as they were (real SQLite files, no training)."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from autofinetune.errors import ConfigError
from autofinetune.search.space import baseline_params, optuna_distributions
from autofinetune.spec import parse_spec
from autofinetune.store.attributes import BASELINE_ATTR, WARM_START_ATTR
from autofinetune.store.database import open_storage
from autofinetune.store.study import create_or_resume_study
from autofinetune.store.warm_start import check_warm_start, read_sources, with_warm_start

from conftest import tiny_spec_dict


def _source(url: str, name: str, results: list[tuple[dict, float]], **spec_fields):
    """An autofinetune study with COMPLETE trials of the given params (the rest the baseline's)."""
    spec = parse_spec(tiny_spec_dict(name=name, **spec_fields))
    study, _ = create_or_resume_study(spec, open_storage(url))
    for params, value in results:
        full = {**baseline_params(spec), **params}
        study.add_trial(optuna.trial.create_trial(params=full, distributions=optuna_distributions(spec, full), value=value))
    return study


def _snapshot(study):
    return [(t.number, t.state, t.params, t.value, t.user_attrs, t.system_attrs) for t in study.get_trials()], study.user_attrs


@pytest.fixture
def databases(tmp_path):
    """Two databases: ``here`` with study ``a``, ``other`` with study ``b`` (in a wider space)."""
    here, other = f"sqlite:///{tmp_path / 'here.db'}", f"sqlite:///{tmp_path / 'other.db'}"
    _source(here, "a", [({"head_units": 8, "phase1_lr": 2e-3}, 0.7), ({"head_units": 16}, 0.9),
                        ({"head_units": 8, "phase1_lr": 5e-3}, 0.8), ({"head_units": 16, "phase1_lr": 9e-3}, 0.1)])
    _source(other, "b", [({"head_units": 64, "phase1_lr": 0.5}, 0.95), ({"head_units": 8, "phase1_lr": 2e-3}, 0.9),
                         ({"head_units": 16, "phase2_lr": 5e-3}, 0.3)],
            search={"head_units": [8, 16, 64], "phase1_lr": {"low": 1e-4, "high": 1.0, "log": True}})
    return here, other


def test_a_new_study_queues_the_baseline_then_the_sources_best_moved_into_its_space(databases):
    here, other = databases
    before = _snapshot(optuna.load_study(study_name="b", storage=other))
    spec = parse_spec(tiny_spec_dict(name="new", search={"warm_start": ["a", f"b@{other}"], "warm_start_trials": 3,
                                                         "n_trials": 10}))
    check_warm_start(spec, here)
    study, created = create_or_resume_study(spec, open_storage(here))
    queued = study.get_trials(states=(TrialState.WAITING,))
    assert created and queued[0].user_attrs == {BASELINE_ATTR: True}
    baseline = baseline_params(spec)
    # Each source's trial 0 is its queued baseline. Rank 0: a#2 is this baseline (skipped); b#1's head 64
    # and rate 0.5 come into this space (16, 1e-2). Rank 1: a#3, b#2 (= a#1, so a#1 comes no more).
    assert [t.user_attrs[WARM_START_ATTR] for t in queued[1:]] == [f"b@{other}#1", "a#3", f"b@{other}#2"]
    fixed = [t.system_attrs["fixed_params"] for t in queued[1:]]
    assert fixed[0] == {**baseline, "head_units": 16, "phase1_lr": pytest.approx(1e-2)}
    assert fixed[1] == {**baseline, "head_units": 8, "phase1_lr": 5e-3}
    assert fixed[2] == {**baseline, "head_units": 8, "phase1_lr": 2e-3}
    assert _snapshot(optuna.load_study(study_name="b", storage=other)) == before, "the source is only read"
    from autofinetune.viewing.report import format_study_status, trial_document

    assert f"warm start: b@{other}#1" in format_study_status(study)
    assert trial_document(queued[2])["warm_start_from"] == "a#3"

    resumed, created = create_or_resume_study(spec, open_storage(here))
    assert not created and len(resumed.get_trials()) == len(study.get_trials()), "a resume queues nothing again"


def test_the_queued_configurations_fit_the_budget(databases):
    here, other = databases
    spec = parse_spec(tiny_spec_dict(name="small", search={"warm_start": [f"b@{other}"], "n_trials": 2}))
    study, _ = create_or_resume_study(spec, open_storage(here))
    assert [bool(t.user_attrs.get(WARM_START_ATTR)) for t in study.get_trials()] == [False, True]


def test_source_trials_are_the_finished_feasible_ones(databases):
    here, other = databases
    spec = parse_spec(tiny_spec_dict(name="new", search={"warm_start": ["a", f"b@{other}"]}))
    sources = read_sources(spec, open_storage(here))
    assert [(s.label, len(s.trials)) for s in sources] == [("a", 4), (f"b@{other}", 3)]


@pytest.mark.parametrize("reference, message", [
    ("nope", "'nope': study 'nope' does not exist in this database; existing studies: a, loss, plain; a reference is NAME"),
    ("b@sqlite:///{tmp}/missing.db", "'b@sqlite:///{tmp}/missing.db': the database 'sqlite:///{tmp}/missing.db' does not exist"),
    ("new", "'new' is the study itself; name earlier studies"),
    ("loss", "'loss': it is scored by val_loss (minimize), this study by val_accuracy (maximize); a warm-start "
             "study must have the same objective"),
    ("plain", "'plain': it was not created by `autofinetune launch`"),
])
def test_bad_references_are_refused_naming_the_field_and_nothing_is_written(databases, tmp_path, reference, message):
    here, _ = databases
    _source(here, "loss", [], objective={"metric": "val_loss"})
    optuna.create_study(study_name="plain", storage=here)
    spec = parse_spec(tiny_spec_dict(name="new", search={"warm_start": [reference.format(tmp=tmp_path)]}))
    with pytest.raises(ConfigError) as error:
        check_warm_start(spec, here)
    assert str(error.value).startswith(f"search.warm_start: {message.format(tmp=tmp_path)}")
    assert not (tmp_path / "missing.db").exists()
    assert "new" not in optuna.get_all_study_names(here)


def test_the_flag_overrides_the_field_and_its_errors_name_the_flag(databases):
    here, _ = databases
    spec = parse_spec(tiny_spec_dict(name="new", search={"warm_start": ["a"]}))
    assert with_warm_start(spec, ["x, y@sqlite:///y.db"]).search.warm_start == ("x", "y@sqlite:///y.db")
    assert with_warm_start(spec, [""]).search.warm_start == ()
    assert with_warm_start(spec, None) is spec
    with pytest.raises(ConfigError, match=r"^--warm-start: got 'y@nowhere'; a reference is NAME"):
        with_warm_start(spec, ["y@nowhere"])
    with pytest.raises(ConfigError, match=r"^--warm-start: 'ghost': study 'ghost' does not exist"):
        check_warm_start(with_warm_start(spec, ["ghost"]), here, flag=True)
    with pytest.raises(ConfigError, match=r"search.warm_start: got 'b@postgresql://me:\*\*\*@db/x'; a URL here must not"):
        parse_spec(tiny_spec_dict(search={"warm_start": ["b@postgresql://me:secret@db/x"]}))


def test_a_study_of_several_objectives_is_not_warm_started(databases):
    here, _ = databases
    spec = parse_spec(tiny_spec_dict(
        name="new", objective={"pareto_with": ["params"]}, search={"warm_start": ["a"], "pruner": "none"},
    ))
    with pytest.raises(ConfigError, match=r"^search.warm_start: got \['a'\] with objective.pareto_with; warm start "
                                          "needs a study of one objective"):
        check_warm_start(spec, here)
