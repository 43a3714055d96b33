"""A backbone of the user's own, named in the spec as ``module:function``: no Python
registration, its module next to the spec file, resolved by every process that reads the spec,
its blocks unfrozen by name with BatchNorm frozen, a study run and exported with it, and the
errors that name the field and the value."""

from __future__ import annotations

import pickle
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from autofinetune.errors import ConfigError  # noqa: E402
from autofinetune.spec import get_backbone_info, load_spec, parse_spec  # noqa: E402
from autofinetune.trial.backbones import (  # noqa: E402
    block_map,
    build_backbone,
    residual_block_names,
    unregister_backbone,
)
from autofinetune.trial.model import (  # noqa: E402
    build_classifier,
    build_feature_extractor,
    build_trainable_part,
    unfreeze_top_blocks,
)

from conftest import cli_env, tiny_spec_dict, write_spec  # noqa: E402

#: The user's module: a stem and three blocks of Keras built-in layers, each with a BatchNorm;
#: beside ``build`` the wrong functions the error tests name.
MODULE = '''
import keras
from keras import layers


def _net(image_size, pooled=False):
    inputs = keras.Input(shape=(image_size, image_size, 3))
    x = layers.Rescaling(1 / 255.0, name="rescale")(inputs)
    x = layers.Conv2D(4, 3, padding="same", name="stem_conv")(x)
    for i in (1, 2, 3):
        x = layers.Conv2D(4 * i, 3, padding="same", strides=1 if i == 1 else 2, name=f"blk{i}_conv")(x)
        x = layers.BatchNormalization(name=f"blk{i}_bn")(x)
        x = layers.Activation("relu", name=f"blk{i}_relu")(x)
    if pooled:
        x = layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, x, name="small")


def build(*, image_size, weights=None):
    model = _net(image_size)
    if weights is not None:
        model.load_weights(weights)
    return model, ["blk1", "blk2", "blk3"]


def model_only(*, image_size, weights=None):
    return _net(image_size)


def pooled(*, image_size, weights=None):
    return _net(image_size, pooled=True), ["blk1", "blk2", "blk3"]


def top_down(*, image_size, weights=None):
    return _net(image_size), ["blk3", "blk2", "blk1"]


def unknown_block(*, image_size, weights=None):
    return _net(image_size), ["blk1", "blk9"]


not_a_function = 3
'''

BLOCKS = ["blk1", "blk2", "blk3"]


@pytest.fixture
def user_module(tmp_path):
    """The module's name, its file in ``tmp_path`` (next to the specs); a fresh name per test,
    since Python imports a module once per process."""
    name = f"my_nets_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(MODULE, encoding="utf-8")
    yield name
    for function in ("build", "pooled", "top_down", "unknown_block"):
        unregister_backbone(f"{name}:{function}")
    sys.modules.pop(name, None)


def user_spec(backbone: str, **overrides):
    """The tiny spec on ``backbone``, its unfreeze depths within the three blocks."""
    return tiny_spec_dict(backbone={"name": backbone}, **{"search": {"unfreeze_depth": {"low": 0, "high": 3}}, **overrides})


def test_the_spec_loads_it_from_the_spec_files_folder_and_the_catalogue_counts_its_blocks(tmp_path, user_module):
    name = f"{user_module}:build"
    spec = load_spec(write_spec(tmp_path, user_spec(name)))
    assert user_module not in sys.path and str(tmp_path) not in sys.path, "on the import path for the import only"
    info = get_backbone_info(name)
    assert (info.num_blocks, info.family, info.preprocessing, info.has_imagenet_weights) == (3, "user", "none", False)
    assert spec.backbone_info() == info
    # Among the choices of search.backbone, next to a built-in one.
    choice = load_spec(write_spec(tmp_path, user_spec(name, search={"backbone": ["tiny_resnet", name],
                                                                      "unfreeze_depth": 3}), "choice.toml"))
    assert choice.backbone_choices == ["tiny_resnet", name]
    with pytest.raises(ConfigError, match=rf"search.unfreeze_depth: got up to 4; backbone '{name}' has 3 blocks"):
        parse_spec(user_spec(name, search={"backbone": ["tiny_resnet", name], "unfreeze_depth": 4}), base_dir=tmp_path)


def test_the_top_blocks_unfreeze_by_name_with_batchnorm_frozen_and_the_cuts_compute_the_classifier(
    tmp_path, user_module
):
    name = f"{user_module}:build"
    parse_spec(user_spec(name), base_dir=tmp_path)
    keras.utils.set_random_seed(0)
    backbone = build_backbone(name, image_size=16)
    assert residual_block_names(backbone) == BLOCKS
    owner = block_map(backbone)
    assert unfreeze_top_blocks(backbone, 2) == ["blk3", "blk2"]
    trainable = {layer.name for layer in backbone.layers if layer.trainable and layer.weights}
    assert trainable == {"blk2_conv", "blk3_conv"}, "the top two blocks but their BatchNorm"
    assert owner["stem_conv"] is None and not backbone.get_layer("blk1_conv").trainable
    unfreeze_top_blocks(backbone, 0)

    model = build_classifier(backbone, num_classes=3, head_units=4, preprocessing="none")
    images = np.random.default_rng(0).uniform(0, 255, (4, 16, 16, 3)).astype("float32")
    direct = model.predict(images, verbose=0)
    for depth in (0, 1, 3):  # what the feature cache stores, fed to the trainable part
        features = build_feature_extractor(model, depth).predict(images, verbose=0)
        stitched = build_trainable_part(model, depth).predict(features, verbose=0)
        np.testing.assert_allclose(stitched, direct, rtol=1e-4, atol=1e-5)


def test_a_weights_file_is_handed_to_the_function(tmp_path, user_module):
    name = f"{user_module}:build"
    parse_spec(user_spec(name), base_dir=tmp_path)
    keras.utils.set_random_seed(1)
    saved = build_backbone(name, image_size=16)
    saved.save_weights(tmp_path / "small.weights.h5")
    keras.utils.set_random_seed(2)
    loaded = build_backbone(name, image_size=16, weights=tmp_path / "small.weights.h5")
    for mine, theirs in zip(loaded.weights, saved.weights):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))


#: A fresh process, as a Ray worker is: it unpickles the spec (no validation runs) and trains.
FRESH_TRIAL = """
import pickle, sys
spec = pickle.load(open(sys.argv[1], "rb"))
module = spec.backbone.name.split(":")[0]
assert module not in sys.modules and not any(spec.base_dir == p for p in sys.path)
from autofinetune.data.sources import load_data
from autofinetune.search.space import baseline_params
from autofinetune.trial.schedule import run_trial
result = run_trial(spec, baseline_params(spec), load_data(spec), feature_cache=False)
print("unfrozen", list(result.unfrozen_blocks), result.state)
"""


def test_a_fresh_process_that_never_imported_the_module_resolves_it_from_the_spec(tmp_path, user_module):
    name = f"{user_module}:build"
    spec = parse_spec(
        user_spec(name, search={"unfreeze_depth": 2}, schedule={"phase1_epochs": 1, "phase2_epochs": 1}),
        base_dir=tmp_path,
    )
    (tmp_path / "spec.pkl").write_bytes(pickle.dumps(spec))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", FRESH_TRIAL, str(tmp_path / "spec.pkl")],
        cwd=elsewhere, env=cli_env(), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "unfrozen ['blk3', 'blk2'] complete" in done.stdout.lower(), done.stdout[-2000:]


BARE_LOAD = """
import sys
sys.modules["autofinetune"] = None  # any import of it fails
import numpy as np, keras
model = keras.saving.load_model(sys.argv[1])
print("predicted", model.predict(np.zeros((2, 16, 16, 3), "float32"), verbose=0).shape)
"""


def test_a_study_runs_with_it_and_its_export_loads_without_autofinetune(tmp_path, user_module):
    from click.testing import CliRunner

    from autofinetune.cli import main

    name = f"{user_module}:build"
    spec_path = write_spec(tmp_path, user_spec(
        name, name="user-backbone", schedule={"phase1_epochs": 1, "phase2_epochs": 1},
        search={"n_trials": 2, "pruner": "none", "unfreeze_depth": {"low": 1, "high": 3}},
    ))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    elsewhere = tmp_path / "elsewhere"  # the module is found next to the spec, not in the working folder
    elsewhere.mkdir()
    launched = subprocess.run(
        [sys.executable, "-m", "autofinetune.cli", "launch", str(spec_path), "--storage", url],
        cwd=elsewhere, env=cli_env(), capture_output=True, text=True, timeout=600,
    )
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    out = tmp_path / "export"
    exported = CliRunner().invoke(main, ["export", "user-backbone", "--storage", url, "--out", str(out)],
                                  catch_exceptions=False)
    assert exported.exit_code == 0, exported.output
    model_file = next(out.glob("*.keras"))
    done = subprocess.run(
        [sys.executable, "-c", BARE_LOAD, str(model_file)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "predicted (2, 3)" in done.stdout


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("model_only", r"must return \(keras.Model, list of block names\), but returned a Functional"),
        ("pooled", "outputs a 2-D tensor; expected a 4-D feature map"),
        ("top_down", r"its layers give the blocks \['blk1', 'blk2', 'blk3'\], but it returned \['blk3'"),
        ("unknown_block", "block 'blk9' names no layer"),
        ("not_a_function", "'not_a_function' is a int, not a function"),
        ("missing", "has no attribute 'missing'"),
    ],
)
def test_a_function_that_does_not_fit_is_a_config_error_naming_the_field_and_value(
    tmp_path, user_module, function, message
):
    name = f"{user_module}:{function}"
    with pytest.raises(ConfigError, match=rf"backbone.name: '{name}'.*{message}"):
        parse_spec(user_spec(name), base_dir=tmp_path)


def test_a_missing_module_names_the_field_the_value_and_where_it_looked(tmp_path):
    with pytest.raises(ConfigError, match=r"search.backbone: 'no_such_nets:build': cannot import module "
                                          rf"'no_such_nets' \(looked in {tmp_path}.*No module named"):
        parse_spec(user_spec("tiny_resnet", search={"backbone": ["tiny_resnet", "no_such_nets:build"],
                                                    "unfreeze_depth": 2}), base_dir=tmp_path)


def test_imagenet_weights_are_refused_and_unknown_plain_names_mention_module_function(tmp_path, user_module):
    name = f"{user_module}:build"
    with pytest.raises(ConfigError, match=rf'backbone.weights: "imagenet"; backbone \'{name}\' has no ImageNet weights'):
        parse_spec(tiny_spec_dict(backbone={"name": name, "weights": "imagenet"}, search={"unfreeze_depth": 2}),
                   base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"unknown backbone 'nope'; allowed: .*or a backbone function of your own "
                                          "as 'module:function'"):
        parse_spec(user_spec("nope"), base_dir=tmp_path)


def test_the_module_is_on_the_import_path_only_while_it_is_imported(tmp_path, user_module):
    before = list(sys.path)
    parse_spec(user_spec(f"{user_module}:build"), base_dir=tmp_path)
    assert sys.path == before
    assert Path(sys.modules[user_module].__file__).parent == tmp_path


def test_keras_tuner_builds_it_in_its_hypermodel(tmp_path, user_module):
    """keras-tuner builds each trial's model itself (its hypermodel), from the spec's name."""
    import autofinetune

    pytest.importorskip("keras_tuner")
    name = f"{user_module}:build"
    spec_path = write_spec(tmp_path, user_spec(
        name, name="user-backbone-kt", schedule={"phase1_epochs": 1, "phase2_epochs": 1},
        search={"n_trials": 2, "pruner": "none", "baseline_trial": False, "backbone": [name],
                "unfreeze_depth": {"low": 1, "high": 3}},
    ))
    study = autofinetune.launch(spec_path, engine="keras-tuner", tuner="random",
                                storage=f"sqlite:///{tmp_path / 'study.db'}", progress=False)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 2
    assert {t.params["backbone"] for t in trials} == {name}
    assert all(set(t.user_attrs["unfrozen_blocks"]) <= set(BLOCKS) for t in trials)


def test_a_study_is_read_where_its_backbone_module_is_not(tmp_path, user_module):
    """``export`` of a kept model, ``status`` and the reports read the stored spec without
    importing the function; only what trains needs the module."""
    from autofinetune.spec import SKIP_BACKBONE_FUNCTIONS, StudySpec

    stored = {**user_spec("gone_nets:build"), "base_dir": str(tmp_path)}
    spec = StudySpec.model_validate(stored, context={SKIP_BACKBONE_FUNCTIONS: True})
    assert spec.backbone.name == "gone_nets:build" and "gone_nets" not in sys.modules
    with pytest.raises(ConfigError, match="backbone.name: 'gone_nets:build': cannot import module 'gone_nets'"):
        spec.backbone_info()
