"""The phase-1 optimizer as a choice with its own parameters (conditional, as Optuna has them), and
the augmentation strengths as searchable parameters: the spec's space, the records, the trials."""

from __future__ import annotations

import numpy as np
import pytest

from autofinetune.errors import ConfigError
from autofinetune.search.space import baseline_params, complete_params, optuna_distributions, suggest_params
from autofinetune.spec import TrialParams, parse_spec

from conftest import tiny_spec_dict


def optimizer_spec(tmp_path, **search):
    return parse_spec(
        tiny_spec_dict(search={"phase1_optimizer": ["rmsprop", "sgd", "adam"], "head_units": [8], **search}),
        base_dir=tmp_path,
    )


def test_the_optimizer_is_schedule_phase1_optimizer_unless_searched(tmp_path):
    spec = parse_spec(tiny_spec_dict(schedule={"phase1_optimizer": "adam"}), base_dir=tmp_path)
    assert optuna_distributions(spec)["phase1_optimizer"].choices == ("adam",)
    baseline = baseline_params(spec)
    # Adam has no momentum but its beta_1; the seed's RMSprop momentum is not asked for.
    assert baseline["phase1_optimizer"] == "adam" and baseline["phase1_beta_1"] == 0.9
    assert "phase1_momentum" not in baseline
    with pytest.raises(ConfigError, match="search.phase1_optimizer: choice 'adamw' is not allowed; each choice "
                                          "must be one of 'rmsprop', 'sgd', 'adam'"):
        parse_spec(tiny_spec_dict(search={"phase1_optimizer": ["adamw"]}), base_dir=tmp_path)


def test_each_optimizer_is_asked_only_for_its_own_parameters(tmp_path):
    import optuna

    spec = optimizer_spec(tmp_path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        params = suggest_params(trial, spec)
        optimizer = params["phase1_optimizer"]
        seen.add(optimizer)
        assert ("phase1_momentum" in params) == (optimizer in ("rmsprop", "sgd")), params
        assert ("phase1_beta_1" in params) == (optimizer == "adam"), params
        # The trial's record holds the same names, and the trial's own parameters hold them too.
        assert set(trial.distributions) == set(params) == set(optuna_distributions(spec, params))
        assert TrialParams.from_values(params).to_dict() == params
        study.tell(trial, 0.5)
    assert seen == {"rmsprop", "sgd", "adam"}


def test_a_hand_given_parameter_of_another_optimizer_is_refused_naming_both(tmp_path):
    spec = optimizer_spec(tmp_path)
    assert complete_params(spec, {"phase1_optimizer": "adam", "phase1_beta_1": 0.85})["phase1_beta_1"] == 0.85
    with pytest.raises(ConfigError, match="parameter phase1_momentum: given, but a trial has it only where "
                                          r"phase1_optimizer is one of \['rmsprop', 'sgd'\], and its "
                                          "phase1_optimizer is 'adam'"):
        complete_params(spec, {"phase1_optimizer": "adam", "phase1_momentum": 0.5})
    with pytest.raises(ValueError, match=r"missing \['phase1_beta_1'\]"):
        TrialParams.from_values({k: v for k, v in complete_params(spec, {"phase1_optimizer": "adam"}).items()
                                 if k != "phase1_beta_1"})


def test_a_retuned_adam_trains_as_a_new_keras_adam():
    keras = pytest.importorskip("keras")
    from autofinetune.trial.model import make_optimizer
    from autofinetune.trial.reuse import retune

    def trained(optimizer, *, retune_to=None):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        model.compile(optimizer=optimizer, loss="mse")
        if retune_to is not None:
            optimizer.build(model.trainable_variables)
            retune(optimizer, learning_rate=0.01, momentum=retune_to, weight_decay=0.001)
        x = np.random.default_rng(1).normal(size=(32, 4)).astype("float32")
        model.fit(x, x[:, :3] * 2.0, epochs=3, batch_size=8, verbose=0, shuffle=False)
        return [np.array(w) for w in model.get_weights()]

    keras_adam = trained(make_optimizer("adam", learning_rate=0.01, momentum=0.8, weight_decay=0.001))
    retunable = make_optimizer("adam", learning_rate=0.05, momentum=0.95, retunable=True)
    retuned = trained(retunable, retune_to=0.8)
    assert type(make_optimizer("adam", learning_rate=0.01, momentum=0.8)).__name__ == "Adam"
    for mine, theirs in zip(retuned, keras_adam):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)
    untuned = trained(make_optimizer("adam", learning_rate=0.01, momentum=0.95, weight_decay=0.001))
    assert not np.allclose(untuned[0], keras_adam[0])  # beta_1 matters here, so the match above says something


def test_an_adam_trial_on_kept_models_trains_as_on_new_ones(tmp_path):
    pytest.importorskip("keras")
    from autofinetune.data.sources import load_data
    from autofinetune.trial.features import FeatureCache
    from autofinetune.trial.schedule import run_trial
    from autofinetune.trial.session import TrialSession

    spec = optimizer_spec(tmp_path, unfreeze_depth=1)
    data = load_data(spec)
    first = complete_params(spec, {"phase1_optimizer": "adam", "phase1_beta_1": 0.9, "phase1_lr": 5e-3})
    second = complete_params(spec, {"phase1_optimizer": "adam", "phase1_beta_1": 0.8, "phase1_lr": 5e-3})
    session = TrialSession(FeatureCache(tmp_path / "cache"))
    run_trial(spec, first, data, session=session)
    on_kept = run_trial(spec, second, data, session=session)
    assert on_kept.extra["performance"]["phases_on_kept_models"] >= 1
    fresh = run_trial(spec, second, data, session=TrialSession(FeatureCache(tmp_path / "cache")))
    assert [r.metrics for r in on_kept.history] == [pytest.approx(r.metrics, rel=1e-5, abs=1e-6) for r in fresh.history]
    assert on_kept.params["phase1_optimizer"] == "adam" and "phase1_momentum" not in on_kept.params


# --- augmentation strengths -----------------------------------------------------------------------


def test_augmentation_strengths_follow_data_augmentation_unless_searched(tmp_path):
    spec = parse_spec(
        tiny_spec_dict(data={"augmentation": {"flip": "horizontal", "zoom": 0.1}}, search={"augment_rotation": [0.0, 0.1]}),
        base_dir=tmp_path,
    )
    spaces = optuna_distributions(spec)
    assert spaces["augment_flip"].choices == ("horizontal",) and spaces["augment_zoom"].choices == (0.1,)
    assert spaces["augment_rotation"].choices == (0.0, 0.1)
    params = TrialParams.from_values(complete_params(spec, {"augment_rotation": 0.1, "augment_flip": "horizontal"}))
    augmentation = spec.for_trial(params).data.augmentation
    assert (augmentation.flip, augmentation.rotation, augmentation.zoom) == ("horizontal", 0.1, 0.1)
    with pytest.raises(ConfigError, match="search.augment_rotation: choice 0.7 is not allowed; each choice must "
                                          r"be a number in \[0, 0.5\]"):
        parse_spec(tiny_spec_dict(search={"augment_rotation": [0.0, 0.7]}), base_dir=tmp_path)
    with pytest.raises(ConfigError, match="search.augment_flip: choice 'diagonal' is not allowed"):
        parse_spec(tiny_spec_dict(search={"augment_flip": ["none", "diagonal"]}), base_dir=tmp_path)


def test_a_trial_with_augmentation_trains_uncached_and_one_without_reads_the_cache(tmp_path):
    pytest.importorskip("keras")
    from autofinetune.data.sources import load_data
    from autofinetune.trial.features import FeatureCache
    from autofinetune.trial.schedule import run_trial
    from autofinetune.trial.session import TrialSession

    spec = parse_spec(
        tiny_spec_dict(search={"head_units": [8], "unfreeze_depth": 1, "augment_zoom": [0.0, 0.3]}), base_dir=tmp_path
    )
    data = load_data(spec)
    session = TrialSession(FeatureCache(tmp_path / "cache"))
    plain = run_trial(spec, complete_params(spec, {"augment_zoom": 0.0}), data, session=session)
    zoomed = run_trial(spec, complete_params(spec, {"augment_zoom": 0.3}), data, session=session,
                       checkpoint_path=tmp_path / "zoomed.keras")
    assert plain.extra["cache"]["layers"], plain.extra["cache"]
    assert zoomed.extra["cache"]["layers"] == [], zoomed.extra["cache"]
    assert zoomed.params["augment_zoom"] == 0.3
    keras = pytest.importorskip("keras")
    model = keras.saving.load_model(tmp_path / "zoomed.keras", compile=False)
    assert model.get_layer("augment_zoom").height_factor == 0.3
