"""Warm start, the search side: other studies' configurations in this space, and a sampler that
starts from their trials (in-memory Optuna studies, no training)."""

from __future__ import annotations

import math
import pickle
import random
from datetime import datetime

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from autofinetune.search.algorithms import make_sampler
from autofinetune.search.space import baseline_params, suggest_params
from autofinetune.search.warm_start import (
    SourceStudy,
    WarmStartSampler,
    best_configurations,
    into_space,
    prior_trials,
    quantiles,
)
from autofinetune.spec import parse_spec

from conftest import tiny_spec_dict

#: The learning rate every toy task does best at.
BEST_LR = 3e-3


def _trial(number: int, params: dict, value: float) -> FrozenTrial:
    return FrozenTrial(
        number=number, trial_id=number, state=TrialState.COMPLETE, value=value, values=None,
        datetime_start=datetime.now(), datetime_complete=datetime.now(), params=params, distributions={},
        user_attrs={}, system_attrs={}, intermediate_values={},
    )


def _one_rate_spec(**search):
    """A space where only phase1_lr varies: a 1-D toy problem."""
    fixed = {"head_units": [8], "unfreeze_depth": [0], "phase1_momentum": [0.0], "phase2_lr": [1e-4],
             "phase2_momentum": [0.9], "phase1_lr": {"low": 1e-5, "high": 1e-1, "log": True}}
    return parse_spec(tiny_spec_dict(search={**fixed, **search}))


def _toy_value(lr: float, scale: float = 1.0) -> float:
    """Higher is better, best at BEST_LR; ``scale`` makes each task's values incomparable."""
    return scale * (1.0 - abs(math.log10(lr) - math.log10(BEST_LR)) / 4)


def _toy_source(label: str, seed: int, scale: float) -> SourceStudy:
    rng = random.Random(seed)
    lrs = [10 ** rng.uniform(-5, -1) for _ in range(30)]
    trials = tuple(_trial(i, {"phase1_lr": lr, "head_units": 8}, _toy_value(lr, scale)) for i, lr in enumerate(lrs))
    return SourceStudy(label=label, maximize=True, trials=trials)


class _Sources:
    """A picklable reader, as store.warm_start's is."""

    def __init__(self, sources):
        self.sources = sources

    def __call__(self, study):
        return self.sources


def test_a_configuration_comes_into_the_space_snapped_filled_and_without_inactive_parameters():
    spec = parse_spec(tiny_spec_dict(search={"phase1_optimizer": ["rmsprop", "adam"], "dropout": [0.0, 0.25]}))
    moved = into_space(spec, {
        "head_units": 100, "unfreeze_depth": 40, "phase1_lr": 1.0, "phase1_optimizer": "adam", "phase1_momentum": 0.5,
        "phase2_lr": 5e-4, "backbone": "resnet50",
    })
    assert moved["head_units"] == 16 and moved["unfreeze_depth"] == 16  # nearest choice, top of the range
    assert moved["phase1_lr"] == pytest.approx(1e-2)  # clipped into [1e-3, 1e-2]
    assert moved["phase2_lr"] == pytest.approx(5e-4)  # inside: kept
    assert moved["backbone"] == "tiny_resnet"  # this spec fixes it
    assert "phase1_momentum" not in moved and moved["phase1_beta_1"] == 0.9  # Adam: beta_1 (seed), no momentum
    assert moved["dropout"] == 0.0 and moved["phase2_momentum"] == 0.9  # missing: the seed recipe's
    assert set(moved) == set(baseline_params(spec)) - {"phase1_momentum"} | {"phase1_beta_1"}


def test_best_configurations_alternate_between_sources_best_first_and_skip_duplicates():
    spec = parse_spec(tiny_spec_dict())
    a = SourceStudy("a", True, (_trial(0, {"head_units": 8}, 0.5), _trial(1, {"head_units": 16}, 0.9),
                                _trial(2, {"head_units": 16, "phase1_lr": 5e-3}, 0.8)))
    b = SourceStudy("b", False, (_trial(0, {"head_units": 12}, 0.1), _trial(1, {"head_units": 16}, 0.3)))
    baseline = baseline_params(spec)  # head_units 16, the rest the seed recipe's
    chosen = best_configurations(spec, [a, b], k=10, known=[baseline])
    # Rank 0: a#1 is the baseline (skipped), b#0 (b minimizes) has head 12 -> 8. Rank 1: a#2 is new,
    # b#1 is the baseline. Rank 2: a#0 (head 8) is b#0 again.
    assert chosen == [("b#0", {**baseline, "head_units": 8}), ("a#2", {**baseline, "phase1_lr": 5e-3})]
    assert len(best_configurations(spec, [a, b], k=1)) == 1


def test_quantiles_rank_each_study_by_its_own_direction():
    assert quantiles([0.2, 0.9, 0.5], maximize=True) == [0.0, 1.0, 0.5]
    assert quantiles([0.2, 0.9, 0.5], maximize=False) == [1.0, 0.0, 0.5]
    assert quantiles([7.0], maximize=True) == [0.5]
    assert quantiles([1.0, 1.0], maximize=True) == [0.5, 0.5]


def test_prior_trials_are_numbered_below_zero_in_the_space_with_comparable_values():
    spec = _one_rate_spec()
    prior = prior_trials(spec, [_toy_source("a", 0, 1.0), _toy_source("b", 1, 100.0)], maximize=True)
    assert [t.number for t in prior] == list(range(-60, 0))
    assert all(0.0 <= t.value <= 1.0 for t in prior)
    best = [t for t in prior if t.value == 1.0]
    assert len(best) == 2, "each source's best has the top quantile, whatever its raw scale"
    assert all(set(t.distributions) == set(t.params) for t in prior)


def _first_samples(sampler, spec, n: int) -> list[float]:
    study = optuna.create_study(direction="maximize", sampler=sampler)
    rates = []
    for _ in range(n):
        trial = study.ask()
        lr = suggest_params(trial, spec)["phase1_lr"]
        study.tell(trial, _toy_value(lr))
        rates.append(lr)
    return rates


def test_warm_started_tpe_samples_its_first_trials_near_the_sources_best():
    spec = _one_rate_spec()
    sources = _Sources([_toy_source("a", 0, 1.0), _toy_source("b", 1, 50.0)])

    def distance(rates):
        return sum(abs(math.log10(lr) - math.log10(BEST_LR)) for lr in rates) / len(rates)

    warm, cold = [], []
    for seed in range(4):
        warm += _first_samples(WarmStartSampler(optuna.samplers.TPESampler(seed=seed), spec, sources), spec, 5)
        cold += _first_samples(optuna.samplers.TPESampler(seed=seed), spec, 5)
    # Cold TPE samples its first 10 at random over 4 decades (mean distance ~1); warm, near 3e-3.
    assert distance(warm) < 0.5 * distance(cold), (distance(warm), distance(cold))
    assert distance(warm) < 0.5


def test_the_sources_fade_out_and_random_sampling_sees_the_study_as_it_is():
    spec = _one_rate_spec()
    sampler = WarmStartSampler(optuna.samplers.TPESampler(seed=0), spec, _Sources([_toy_source("a", 0, 1.0)]), fade_after=4)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    shown = []
    for _ in range(5):
        shown.append(len(sampler._view(study)._get_trials(deepcopy=False, states=(TrialState.COMPLETE,))))
        trial = study.ask()
        study.tell(trial, _toy_value(suggest_params(trial, spec)["phase1_lr"]))
    assert shown == [30, 1 + 23, 2 + 15, 3 + 8, 4 + 0]
    assert len(study.trials) == 5, "no source trial is recorded in the study"
    blind = WarmStartSampler(optuna.samplers.RandomSampler(seed=0), spec, _Sources([_toy_source("a", 0, 1.0)]))
    assert blind._view(study) is study


def test_the_sampler_pickles_without_the_trials_and_reads_them_again():
    spec = _one_rate_spec(warm_start=["a"])
    sampler = make_sampler(spec, seed=0, sources=_Sources([_toy_source("a", 0, 1.0)]))
    assert isinstance(sampler, WarmStartSampler)
    _first_samples(sampler, spec, 1)
    copy = pickle.loads(pickle.dumps(sampler))
    assert copy._prior is None and len(_first_samples(copy, spec, 2)) == 2
    assert not isinstance(make_sampler(_one_rate_spec(), seed=0, sources=_Sources([])), WarmStartSampler)


def test_a_source_that_cannot_be_read_is_one_warning_and_the_sampler_samples_cold(caplog):
    def broken(study):
        raise RuntimeError("database gone")

    spec = _one_rate_spec()
    with caplog.at_level("WARNING"):
        rates = _first_samples(WarmStartSampler(optuna.samplers.TPESampler(seed=0), spec, broken), spec, 3)
    assert len(rates) == 3
    assert sum("database gone" in r.getMessage() for r in caplog.records) == 1


def test_under_constraints_the_sources_trials_count_as_feasible_as_the_studys_trials_record_it():
    from autofinetune.spec.constraints import CONSTRAINT_VIOLATIONS_ATTR

    spec = _one_rate_spec(warm_start=["a"]).model_copy(
        update={"objective": parse_spec(tiny_spec_dict(objective={"constraints": ["params <= 1e6"]})).objective}
    )
    prior = prior_trials(spec, [_toy_source("a", 0, 1.0)], maximize=True)
    assert all(t.constraints and all(v == 0.0 for v in t.constraints.values()) for t in prior)
    study = optuna.create_study(direction="maximize", sampler=make_sampler(spec, seed=0, sources=_Sources([_toy_source("a", 0, 1.0)])))
    for violation in (0.0, 5.0, 0.0):
        trial = study.ask()
        lr = suggest_params(trial, spec)["phase1_lr"]
        trial.set_user_attr(CONSTRAINT_VIOLATIONS_ATTR, [violation])
        study.tell(trial, _toy_value(lr))
    # The study's trials record theirs as the sources' are shown: the same keys (GP needs them).
    assert [set(t.constraints) for t in study.trials] == [set(prior[0].constraints)] * 3
    assert [max(t.constraints.values()) for t in study.trials] == [0.0, 5.0, 0.0]
