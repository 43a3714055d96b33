"""The classifier: preprocessing inside, exact unfreezing by block, BatchNorm always frozen."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from autofinetune.trial.backbones import build_backbone, residual_block_names  # noqa: E402
from autofinetune.errors import ConfigError  # noqa: E402
from autofinetune.trial.model import (  # noqa: E402
    build_classifier,
    count_trainable_params,
    find_backbone,
    freeze_backbone,
    unfreeze_top_blocks,
)


@pytest.fixture(scope="module")
def tiny_classifier():
    backbone = build_backbone("tiny_resnet", image_size=16)
    model = build_classifier(backbone, num_classes=3, head_units=8)
    return model, backbone


@pytest.mark.parametrize("depth", [0, 1, 3, 7, 16])
def test_unfreeze_exactly_top_blocks_and_keep_batchnorm_frozen(tiny_classifier, depth):
    model, backbone = tiny_classifier
    blocks = residual_block_names(backbone)
    assert len(blocks) == 16 and blocks[0] == "conv2_block1" and blocks[-1] == "conv5_block3"

    unfrozen = unfreeze_top_blocks(backbone, depth)

    assert unfrozen == blocks[::-1][:depth]
    if depth:
        assert unfrozen[0] == "conv5_block3"
    trainable_layers = [layer for layer in backbone.layers if layer.trainable and layer.weights]
    assert {layer.name.rsplit("_", 2)[0] for layer in trainable_layers} <= set(unfrozen)
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            assert not layer.trainable, layer.name
        if isinstance(layer, keras.layers.Conv2D):
            in_top = any(layer.name.startswith(block + "_") for block in unfrozen)
            assert layer.trainable == in_top, layer.name
    # The model's trainable weights: the head plus the unfrozen blocks' convolutions, nothing else.
    backbone_trainable = [w for w in model.trainable_weights if any(w is v for v in backbone.weights)]
    assert all(not ("_bn" in w.path or "gamma" in w.path or "beta" in w.path) for w in backbone_trainable)
    assert (len(backbone_trainable) > 0) == (depth > 0)
    freeze_backbone(backbone)


def test_depth_zero_leaves_backbone_frozen(tiny_classifier):
    model, backbone = tiny_classifier
    freeze_backbone(backbone)
    head_only = count_trainable_params(model)
    assert unfreeze_top_blocks(backbone, 0) == []
    assert count_trainable_params(model) == head_only
    assert backbone.trainable_weights == []


def test_trainable_counts_grow_with_depth(tiny_classifier):
    model, backbone = tiny_classifier
    counts = []
    for depth in (0, 1, 4, 16):
        unfreeze_top_blocks(backbone, depth)
        counts.append(count_trainable_params(model))
    freeze_backbone(backbone)
    assert counts == sorted(counts) and len(set(counts)) == 4


def test_depth_out_of_range(tiny_classifier):
    _, backbone = tiny_classifier
    with pytest.raises(ValueError, match=r"unfreeze_depth must be in \[0, 16\], but got 17"):
        unfreeze_top_blocks(backbone, 17)


def test_preprocessing_lives_inside_the_saved_model(tmp_path):
    """The saved model takes raw 0..255 pixels and applies ResNet50's caffe preprocessing."""
    backbone = build_backbone("tiny_resnet", image_size=16)
    model = build_classifier(backbone, num_classes=3, head_units=8)
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.models.load_model(path)

    raw = np.random.default_rng(0).integers(0, 256, size=(4, 16, 16, 3)).astype("float32")
    # The same network fed by hand-preprocessed pixels must agree with the saved model fed raw ones.
    features = keras.Model(model.get_layer("preprocess").output, model.output)
    by_hand = features.predict(keras.applications.resnet50.preprocess_input(raw.copy()), verbose=0)
    np.testing.assert_allclose(reloaded.predict(raw, verbose=0), by_hand, rtol=1e-5, atol=1e-6)
    assert reloaded.get_layer("preprocess") is not None
    assert find_backbone(reloaded).name == "tiny_resnet"


def test_preprocessing_is_a_builtin_layer_equal_to_keras_preprocess_input():
    """The fixed 1x1 convolution computes exactly what ``preprocess_input`` (caffe) computes."""
    from autofinetune.trial.model import PREPROCESS_LAYER

    model = build_classifier(build_backbone("tiny_resnet", image_size=16), num_classes=3, head_units=8)
    layer = model.get_layer(PREPROCESS_LAYER)
    assert type(layer) is keras.layers.Conv2D and not layer.trainable and layer.trainable_weights == []
    raw = np.random.default_rng(2).integers(0, 256, size=(4, 16, 16, 3)).astype("float32")
    expected = keras.applications.resnet50.preprocess_input(raw.copy())
    np.testing.assert_allclose(np.asarray(layer(raw)), expected, rtol=0, atol=1e-4)


def test_a_checkpoint_with_the_former_custom_layer_still_loads(tmp_path):
    """Checkpoints saved before the built-in layer name ``ResNetPreprocess``; they load as before."""
    from autofinetune.trial.model import PREPROCESS_LAYER, ResNetPreprocess

    new = build_classifier(build_backbone("tiny_resnet", image_size=16), num_classes=3, head_units=8)
    inputs = keras.Input(shape=(16, 16, 3), name="image")
    x = ResNetPreprocess(name=PREPROCESS_LAYER)(inputs)
    old = keras.Model(inputs, find_backbone(new)(x, training=False))
    path = tmp_path / "old.keras"
    old.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(reloaded.get_layer(PREPROCESS_LAYER), ResNetPreprocess)
    raw = np.random.default_rng(3).integers(0, 256, size=(2, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(reloaded.predict(raw, verbose=0), old.predict(raw, verbose=0), rtol=1e-5, atol=1e-6)


def test_weights_file_path_loads_the_saved_weights(tmp_path):
    saved = build_backbone("tiny_resnet", image_size=16)
    for weight in saved.weights:
        weight.assign(np.random.default_rng(1).normal(size=weight.shape).astype("float32"))
    path = tmp_path / "tiny.weights.h5"
    saved.save_weights(path)

    fresh = build_backbone("tiny_resnet", image_size=16, weights=None)
    loaded = build_backbone("tiny_resnet", image_size=16, weights=path)
    for a, b in zip(saved.weights, loaded.weights):
        np.testing.assert_array_equal(np.array(a), np.array(b))
    # The file really changed something: freshly initialized weights differ.
    assert any(not np.array_equal(np.array(x), np.array(y)) for x, y in zip(fresh.weights, loaded.weights))


@pytest.mark.slow
def test_resnet50_weights_file_path(tmp_path):
    original = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / "resnet50_notop.weights.h5"
    original.save_weights(path)
    loaded = build_backbone("resnet50", image_size=32, weights=path)
    for a, b in zip(original.weights, loaded.weights):
        np.testing.assert_array_equal(np.array(a), np.array(b))


def test_weights_file_of_another_architecture(tmp_path):
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    path = tmp_path / "other.weights.h5"
    other.save_weights(path)
    with pytest.raises(ConfigError, match=r"could not load '.*other.weights.h5' into backbone 'tiny_resnet'"):
        build_backbone("tiny_resnet", image_size=16, weights=path)


def test_imagenet_unreachable_says_where_to_put_the_file(tmp_path, monkeypatch):
    # An empty Keras cache and no network: the download fails, the error says what to do.
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    import keras.src.utils.file_utils as file_utils

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: network unreachable")

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(ConfigError) as info:
        build_backbone("resnet50", image_size=32, weights="imagenet")
    message = str(info.value)
    assert "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert str(tmp_path / "keras-home" / "models") in message
    assert "backbone.weights" in message


def test_a_trials_backbone_is_built_once_per_session_and_handed_back_as_loaded(tmp_path):
    from autofinetune.trial.session import TrialSession

    trial_backbone = TrialSession().backbone

    weights_file = tmp_path / "tiny.weights.h5"
    saved = build_backbone("tiny_resnet", image_size=16)
    saved.save_weights(weights_file)
    expected = [np.array(v) for v in saved.weights]

    with trial_backbone("tiny_resnet", image_size=16, weights="none") as first:
        pass  # a random-init backbone of another key, replaced below: one is kept per session
    with trial_backbone("tiny_resnet", image_size=16, weights=str(weights_file)) as first:
        unfreeze_top_blocks(first, 3)
        for variable in first.trainable_weights:
            variable.assign(variable + 1.0)  # what phase 2 does to the unfrozen blocks
        with trial_backbone("tiny_resnet", image_size=16, weights=str(weights_file)) as concurrent:
            assert concurrent is not first, "a trial running at the same time gets its own backbone"
    with trial_backbone("tiny_resnet", image_size=16, weights=str(weights_file)) as second:
        assert second is first, "the next trial reuses the built backbone"
        assert all(layer.trainable for layer in second.layers)
        for variable, value in zip(second.weights, expected):
            np.testing.assert_array_equal(np.array(variable), value)

    saved.save_weights(weights_file)  # a rewritten weights file (new mtime) is loaded afresh
    with trial_backbone("tiny_resnet", image_size=16, weights=str(weights_file)) as third:
        assert third is not first
    with trial_backbone("tiny_resnet", image_size=32, weights=str(weights_file)) as other_size:
        assert other_size is not third and other_size.input_shape[1] == 32


def test_the_training_view_outputs_the_logits_behind_the_softmax(tiny_classifier):
    from autofinetune.trial.model import LOGITS_LAYER, training_view

    model, _ = tiny_classifier
    view = training_view(model)
    raw = np.random.default_rng(5).integers(0, 256, size=(4, 16, 16, 3)).astype("float32")
    logits = view.predict(raw, verbose=0)
    np.testing.assert_allclose(np.asarray(keras.ops.softmax(logits)), model.predict(raw, verbose=0), rtol=1e-5, atol=1e-6)
    assert view.get_layer(LOGITS_LAYER) is model.get_layer(LOGITS_LAYER)
    assert {id(w) for w in view.trainable_weights} == {id(w) for w in model.trainable_weights}


def test_the_training_view_needs_the_softmax_at_the_end(tiny_classifier):
    from autofinetune.trial.model import LOGITS_LAYER, training_view

    model, _ = tiny_classifier
    logits_only = keras.Model(model.inputs, model.get_layer(LOGITS_LAYER).output)
    with pytest.raises(ValueError, match="not from the softmax layer"):
        training_view(logits_only)


_SATURATED_HEAD = """
import json, keras, numpy as np
from autofinetune.trial.backbones import build_backbone
from autofinetune.trial.model import LOGITS_LAYER, build_classifier, compile_for_training, find_backbone, freeze_backbone

keras.utils.set_random_seed(0)
model = build_classifier(build_backbone("tiny_resnet", image_size=16), num_classes=3, head_units=8)
freeze_backbone(find_backbone(model))
logits = model.get_layer(LOGITS_LAYER)
# Logits thousands apart: the softmax is 0 or 1 in float32 for every image.
logits.kernel.assign(np.asarray(logits.kernel) * 1e4)
raw = np.random.default_rng(0).integers(0, 256, size=(24, 16, 16, 3)).astype("uint8")
labels = keras.utils.to_categorical(np.arange(24) % 3, 3)
saturated = float(np.mean(np.max(np.asarray(model(raw)), axis=1) > 1 - 1e-7))
before = np.array(logits.kernel)
history = compile_for_training(model, keras.optimizers.SGD(learning_rate=1e-3)).fit(
    raw, labels, epochs=3, batch_size=8, verbose=0
).history
print(json.dumps({"backend": keras.backend.backend(), "saturated": saturated, "loss": history["loss"],
                  "kernel_change": float(np.abs(np.array(logits.kernel) - before).max())}))
"""


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_a_saturated_head_still_learns_on_every_backend(backend):
    """From probabilities, Keras's JAX backend clips a saturated softmax and gets no gradient."""
    import json
    import os
    import subprocess
    import sys

    if backend == "jax":
        pytest.importorskip("jax")
    out = subprocess.run(
        [sys.executable, "-c", _SATURATED_HEAD], capture_output=True, text=True, timeout=300,
        env=dict(os.environ, KERAS_BACKEND=backend),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["backend"] == backend
    assert result["saturated"] == 1.0
    assert result["kernel_change"] > 0
    assert result["loss"][-1] < result["loss"][0]


@pytest.mark.parametrize("optimizer_name", ["sgd", "rmsprop"])
@pytest.mark.parametrize("retunable", [False, True])
def test_weight_decay_shrinks_the_weights_it_trains_by_the_learning_rate(optimizer_name, retunable):
    """Decoupled: with a zero gradient a step multiplies a weight by 1 - lr * weight_decay; a
    retunable optimizer retuned to another decay (0 included) applies that one."""
    from autofinetune.trial.model import make_optimizer
    from autofinetune.trial.reuse import retune

    weight = keras.Variable(np.ones((2,), dtype="float32"))
    optimizer = make_optimizer(optimizer_name, learning_rate=0.1, momentum=0.0, weight_decay=0.5, retunable=retunable)
    optimizer.apply([np.zeros((2,), dtype="float32")], [weight])
    np.testing.assert_allclose(np.asarray(weight), [0.95, 0.95], rtol=1e-6)
    if retunable:
        for decay, expected in ((0.0, 0.95), (0.2, 0.95 * 0.98)):
            retune(optimizer, learning_rate=0.1, momentum=0.0, weight_decay=decay)
            optimizer.apply([np.zeros((2,), dtype="float32")], [weight])
            np.testing.assert_allclose(np.asarray(weight), [expected, expected], rtol=1e-6)
