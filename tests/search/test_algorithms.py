"""The sampler and pruner a spec builds: what autofinetune sets beyond the constructors' defaults."""

from __future__ import annotations

import optuna
import pytest

from autofinetune.engines.ray.options import scheduler_plan
from autofinetune.search.algorithms import make_pruner


def _pruned_steps(pruner, n_trials: int, total_epochs: int) -> list[int]:
    """Run trials that each report one constant value per epoch, every one worse than the last;
    the step each pruned trial stopped at."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    stopped = []
    for index in range(n_trials):
        trial = study.ask()
        value = 1.0 - index / (2 * n_trials)
        for step in range(1, total_epochs + 1):
            trial.report(value, step)
            if trial.should_prune():
                stopped.append(step)
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
        else:
            study.tell(trial, value)
    return stopped


def test_hyperband_ranks_trials_first_at_the_end_of_phase_1_in_both_engines(tiny_spec):
    spec = tiny_spec(search={"pruner": "hyperband"}, schedule={"phase1_epochs": 3, "phase2_epochs": 6})
    stopped = _pruned_steps(make_pruner(spec), n_trials=24, total_epochs=9)
    # Nothing is stopped inside phase 1; weak trials are, at the phase boundary (step 3), before
    # any fine-tuning. Hyperband's second bracket's first rung is 3 * 3 = 9.
    assert stopped and min(stopped) == 3 and set(stopped) <= {3, 9}, stopped
    plan = scheduler_plan(spec)
    assert plan.options["grace_period"] == 3 and plan.options["max_t"] == 9 and plan.options["brackets"] == 2


@pytest.mark.parametrize("schedule, first_rung", [({"phase1_epochs": 2, "phase2_epochs": 0}, 1),
                                                  ({"phase1_epochs": 1, "phase2_epochs": 4}, 1)])
def test_hyperband_without_a_phase_2_or_with_one_phase_1_epoch_ranks_from_epoch_1(tiny_spec, schedule, first_rung):
    spec = tiny_spec(search={"pruner": "hyperband"}, schedule=schedule)
    total = schedule["phase1_epochs"] + schedule["phase2_epochs"]
    stopped = _pruned_steps(make_pruner(spec), n_trials=24, total_epochs=total)
    assert stopped and min(stopped) == first_rung, stopped
    assert scheduler_plan(spec).options["grace_period"] == first_rung


def test_a_spec_min_resource_overrides_the_phase_boundary(tiny_spec):
    spec = tiny_spec(search={"pruner": "hyperband", "pruner_options": {"min_resource": 1}},
                     schedule={"phase1_epochs": 3, "phase2_epochs": 6})
    assert min(_pruned_steps(make_pruner(spec), n_trials=24, total_epochs=9)) == 1
    assert scheduler_plan(spec).options["grace_period"] == 1
