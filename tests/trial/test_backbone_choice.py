"""The backbone as a searchable parameter: the spec's checks over every choice, the baseline,
hand-given params, and trials that build, cache and record the backbone they were given."""

from __future__ import annotations

import pytest

from autofinetune.errors import ConfigError
from autofinetune.search.space import baseline_params, complete_params, optuna_distributions, parse_param_assignments
from autofinetune.spec import parse_spec

from conftest import tiny_spec_dict

CHOICES = ["tiny_resnet", "mobilenetv3_small"]


def choice_spec(tmp_path, **search):
    data = tiny_spec_dict(
        data={"image_size": 32},
        search={"backbone": CHOICES, "unfreeze_depth": {"low": 0, "high": 11}, **search},
    )
    return parse_spec(data, base_dir=tmp_path)


def test_without_search_backbone_the_one_backbone_is_a_fixed_parameter(tmp_path):
    spec = parse_spec(tiny_spec_dict(), base_dir=tmp_path)
    assert spec.backbone_choices == ["tiny_resnet"]
    assert optuna_distributions(spec)["backbone"].choices == ("tiny_resnet",)
    assert baseline_params(spec)["backbone"] == "tiny_resnet"
    # The stored form parses back to the same spec.
    assert parse_spec(spec.to_toml_dict(), base_dir=tmp_path) == spec


def test_a_search_over_backbones_is_a_categorical_parameter_and_its_baseline_is_the_tutorials(tmp_path):
    spec = choice_spec(tmp_path)
    assert optuna_distributions(spec)["backbone"].choices == tuple(CHOICES)
    assert baseline_params(spec)["backbone"] == "tiny_resnet"  # ResNet50 is not among them: the first
    with_resnet = parse_spec(
        tiny_spec_dict(data={"image_size": 32}, search={"backbone": ["convnext_tiny", "resnet50"]}), base_dir=tmp_path
    )
    assert baseline_params(with_resnet)["backbone"] == "resnet50"


@pytest.mark.parametrize(
    ("search", "backbone", "message"),
    [
        ({"backbone": ["tiny_resnet", "nope"]}, {}, "search.backbone: unknown backbone 'nope'; allowed: .*convnext_tiny"),
        ({"backbone": CHOICES, "unfreeze_depth": {"low": 0, "high": 17}}, {},
         "search.unfreeze_depth: got up to 17; backbone 'tiny_resnet' has 16 blocks"),
        ({"backbone": CHOICES, "unfreeze_depth": {"low": 12, "high": 16}}, {},
         "search.unfreeze_depth: got 12 at least; backbone 'mobilenetv3_small' has 11 blocks"),
        ({"backbone": CHOICES, "unfreeze_depth": [2, 14]}, {},
         "got up to 14; backbone 'mobilenetv3_small' has 11 blocks, so every listed depth must be in "
         r"\[0, 11\]; a range"),
        ({"backbone": {"low": 1, "high": 2}}, {}, "search.backbone: got a range"),
        ({"backbone": [""]}, {}, "search.backbone: choice '' is not allowed"),
        ({"backbone": ["tiny_resnet", "tiny_resnet"]}, {}, "repeat a value"),
        ({"backbone": CHOICES, "unfreeze_depth": 3}, {"weights": "some.weights.h5"}, "a weights file fits one architecture"),
        ({"backbone": ["tiny_resnet", "resnet50"], "unfreeze_depth": 3}, {"weights": "imagenet"},
         "backbone 'tiny_resnet' has no ImageNet weights"),
    ],
)
def test_every_backbone_choice_is_checked_against_the_spec(tmp_path, search, backbone, message):
    data = tiny_spec_dict(data={"image_size": 32}, search=search, backbone=backbone)
    with pytest.raises(ConfigError, match=message):
        parse_spec(data, base_dir=tmp_path)


def test_an_image_size_too_small_for_one_choice_names_it(tmp_path):
    data = tiny_spec_dict(data={"image_size": 16}, search={"backbone": CHOICES, "unfreeze_depth": 3})
    with pytest.raises(ConfigError, match="data.image_size: got 16; backbone 'mobilenetv3_small' needs at least 32"):
        parse_spec(data, base_dir=tmp_path)


@pytest.mark.parametrize(
    ("depths", "tiny_resnet", "mobilenet"),
    [
        ({"low": 0, "high": 16}, {"low": 0, "high": 16}, {"low": 0, "high": 11}),
        ({"low": 1, "high": 16, "step": 3}, {"low": 1, "high": 16, "step": 3}, {"low": 1, "high": 10, "step": 3}),
        ({"low": 0, "high": 9}, {"low": 0, "high": 9}, {"low": 0, "high": 9}),
    ],
)
def test_each_trial_chooses_its_depth_up_to_its_own_backbones_blocks(tmp_path, depths, tiny_resnet, mobilenet):
    import optuna

    from autofinetune.engines.keras_tuner.space import keras_tuner_params, params_from_keras_tuner
    from autofinetune.search.space import suggest_params
    from autofinetune.spec.params import parse_param

    spec = choice_spec(tmp_path, unfreeze_depth=depths)
    expected = {"tiny_resnet": parse_param("unfreeze_depth", tiny_resnet),
                "mobilenetv3_small": parse_param("unfreeze_depth", mobilenet)}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(10):
        trial = study.ask()
        params = suggest_params(trial, spec)
        own = expected[params["backbone"]]
        assert trial.distributions["unfreeze_depth"] == optuna_distributions(spec, params)["unfreeze_depth"]
        assert params["unfreeze_depth"] in own.integer_values(), (params, own)
        study.tell(trial, 0.0)
    # keras-tuner declares the depth once, over the spec's range; a trial takes the nearest depth
    # its own backbone has, and records that.
    kt = pytest.importorskip("keras_tuner")
    hp = kt.HyperParameters()
    keras_tuner_params(hp, spec)
    deepest = max(expected["tiny_resnet"].integer_values())
    for backbone, own in expected.items():
        values = {**hp.values, "backbone": backbone, "unfreeze_depth": deepest}
        assert params_from_keras_tuner(values, spec)["unfreeze_depth"] == max(own.integer_values())
        hp.values.update(values)
        assert keras_tuner_params(hp, spec)["unfreeze_depth"] == max(own.integer_values())


def test_a_hand_given_backbone_is_a_name_checked_against_the_catalogue(tmp_path):
    spec = choice_spec(tmp_path)
    assert parse_param_assignments(["backbone=mobilenetv3_small"]) == {"backbone": "mobilenetv3_small"}
    params = complete_params(spec, {"backbone": "mobilenetv3_small", "unfreeze_depth": 2})
    assert params["backbone"] == "mobilenetv3_small"
    with pytest.raises(ConfigError, match="unknown backbone 'nope'"):
        complete_params(spec, {"backbone": "nope"})
    with pytest.raises(ConfigError, match="unfreeze_depth: got 12; backbone 'mobilenetv3_small' has 11 blocks"):
        complete_params(spec, {"backbone": "mobilenetv3_small", "unfreeze_depth": 12})
    with pytest.raises(ConfigError, match="parameter backbone: got 3"):
        complete_params(spec, {"backbone": 3})


def test_each_trial_builds_caches_and_records_its_own_backbone(tmp_path):
    pytest.importorskip("keras")
    from autofinetune.data.sources import load_data
    from autofinetune.trial.features import FeatureCache
    from autofinetune.trial.schedule import run_trial
    from autofinetune.trial.session import TrialSession

    spec = choice_spec(tmp_path, head_units=[8])
    data = load_data(spec)
    cache = FeatureCache(tmp_path / "cache")
    session = TrialSession(cache)
    results = {
        name: run_trial(spec, complete_params(spec, {"backbone": name, "unfreeze_depth": 2}), data, session=session)
        for name in CHOICES
    }
    assert list(results["tiny_resnet"].unfrozen_blocks) == ["conv5_block3", "conv5_block2"]
    assert list(results["mobilenetv3_small"].unfrozen_blocks) == ["expanded_conv_10", "expanded_conv_9"]
    # One cache entry per backbone and cut, never shared between them.
    stems = sorted(path.name for path in (tmp_path / "cache").glob("*.npy"))
    assert any(stem.startswith("tiny_resnet-") for stem in stems), stems
    assert any(stem.startswith("mobilenetv3_small-") for stem in stems), stems
    # Again on the same session: each trial reads its own backbone's features from the cache.
    again = run_trial(spec, complete_params(spec, {"backbone": "tiny_resnet", "unfreeze_depth": 2}), data,
                      session=session)
    assert again.extra["cache"]["misses"] == 0
    assert again.history[-1].metrics == pytest.approx(results["tiny_resnet"].history[-1].metrics, rel=1e-5, abs=1e-6)


# --- batch size: the other parameter that follows a spec field -----------------------------------


def test_the_batch_size_is_data_batch_size_unless_searched(tmp_path):
    spec = parse_spec(tiny_spec_dict(data={"batch_size": 12}), base_dir=tmp_path)
    assert optuna_distributions(spec)["batch_size"].choices == (12,)
    assert baseline_params(spec)["batch_size"] == 12
    searched = parse_spec(tiny_spec_dict(search={"batch_size": [8, 16]}), base_dir=tmp_path)
    assert optuna_distributions(searched)["batch_size"].choices == (8, 16)
    with pytest.raises(ConfigError, match="search.batch_size: choice 0 is not allowed"):
        parse_spec(tiny_spec_dict(search={"batch_size": [0, 16]}), base_dir=tmp_path)


@pytest.mark.parametrize(("batch_size", "steps"), [(8, 5), (16, 3)])
def test_a_trial_trains_with_its_own_batch_size(tmp_path, batch_size, steps):
    keras = pytest.importorskip("keras")
    from autofinetune.data.sources import load_data
    from autofinetune.trial.schedule import run_trial

    class StepsPerEpoch(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.counts: list[int] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.counts.append(0)

        def on_train_batch_end(self, batch, logs=None):
            self.counts[-1] += 1

    spec = parse_spec(tiny_spec_dict(search={"batch_size": [8, 16]}), base_dir=tmp_path)
    data = load_data(spec)
    assert len(data.x_train) == 36
    counter = StepsPerEpoch()
    run_trial(spec, complete_params(spec, {"batch_size": batch_size}), data, feature_cache=False, callbacks=[counter])
    assert counter.counts == [steps] * 4  # 2 + 2 epochs, ceil(36 / batch_size) steps each
