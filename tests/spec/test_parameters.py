"""The values a search-space parameter allows: its integers (the depths a search can ask for)."""

from __future__ import annotations

import pytest

from autofinetune.spec.params import parse_param


@pytest.mark.parametrize(
    ("raw", "values"),
    [
        ({"low": 0, "high": 6}, [0, 1, 2, 3, 4, 5, 6]),
        ({"low": 1, "high": 7, "step": 3}, [1, 4, 7]),
        ([6, 2, 0], [0, 2, 6]),
        (3, [3]),
    ],
)
def test_integer_values_lists_every_depth_the_search_can_ask_for(raw, values):
    assert parse_param("unfreeze_depth", raw).integer_values() == values


def test_a_range_of_real_numbers_has_no_integer_values():
    assert parse_param("phase1_lr", {"low": 1e-4, "high": 1e-2, "log": True}).integer_values() == []


def test_every_view_of_the_parameters_is_made_from_their_one_declaration(tmp_path):
    import dataclasses

    from autofinetune.engines.keras_tuner.space import keras_tuner_params
    from autofinetune.search.space import baseline_params, optuna_distributions
    from autofinetune.spec import PARAMETERS, SearchSettings, SearchSpec, TrialParams, parse_spec

    from conftest import tiny_spec_dict

    kt = pytest.importorskip("keras_tuner")
    names = [field.name for field in dataclasses.fields(TrialParams)]
    assert list(PARAMETERS) == names
    # The spec's [search] fields: the settings, then one per parameter, its default space and doc.
    space_fields = [name for name in SearchSpec.model_fields if name not in SearchSettings.model_fields]
    assert space_fields == names
    for name in names:
        assert SearchSpec.model_fields[name].default == PARAMETERS[name].default_space
        assert SearchSpec.model_fields[name].description == PARAMETERS[name].doc
    spec = parse_spec(tiny_spec_dict(), base_dir=tmp_path)
    assert list(optuna_distributions(spec)) == names
    baseline = baseline_params(spec)
    # A trial holds every parameter but those whose condition it does not meet (Adam's beta_1
    # in the baseline's RMSprop trial).
    active = [name for name in names if name != "phase1_beta_1"]
    assert list(baseline) == active
    assert list(optuna_distributions(spec, baseline)) == active
    assert list(keras_tuner_params(kt.HyperParameters(), spec)) == active
    # The trial reads them by attribute, typed as declared.
    params = TrialParams.from_values(baseline)
    assert isinstance(params.head_units, int) and isinstance(params.phase2_lr, float)
    assert params.to_dict() == baseline
    with pytest.raises(ValueError, match=r"missing \['dropout'"):
        TrialParams.from_values({k: v for k, v in baseline.items() if k != "dropout"})
