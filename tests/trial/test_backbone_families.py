"""Every backbone family of the catalogue, with random weights on small images: it builds with
the blocks its entry says, unfreezes its top blocks by name with BatchNorm frozen, its cut
models compute the classifier exactly (the feature cache), and its saved classifier loads
where autofinetune cannot be imported."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from autofinetune.spec.backbones import KERAS_APPLICATIONS, get_backbone_info  # noqa: E402
from autofinetune.trial.backbones import block_map, build_backbone, residual_block_names  # noqa: E402
from autofinetune.trial.model import (  # noqa: E402
    PREPROCESS_LAYER,
    build_classifier,
    build_feature_extractor,
    build_trainable_part,
    unfreeze_top_blocks,
)

#: One backbone of each family whose block names or preprocessing differ from ResNet50's.
FAMILIES = ["resnet50v2", "efficientnetv2-b0", "convnext_tiny", "mobilenetv3_small"]
SIZE = 32


@pytest.mark.parametrize("info", KERAS_APPLICATIONS, ids=lambda info: info.name)
def test_each_catalogued_backbone_builds_with_the_blocks_its_entry_names(info):
    backbone = build_backbone(info.name, image_size=info.min_image_size)
    blocks = residual_block_names(backbone)
    assert len(blocks) == info.num_blocks, blocks
    # Every layer with weights above the stem belongs to a block, so unfreezing every block
    # unfreezes the whole network but its stem.
    owner = block_map(backbone)
    first = next(layer.name for layer in backbone.layers if owner[layer.name] is not None)
    names = [layer.name for layer in backbone.layers]
    assert all(owner[name] is not None for name in names[names.index(first):])


@pytest.fixture(scope="module", params=FAMILIES)
def family_classifier(request):
    info = get_backbone_info(request.param)
    keras.utils.set_random_seed(0)
    backbone = build_backbone(info.name, image_size=SIZE)
    model = build_classifier(backbone, num_classes=3, head_units=8, preprocessing=info.preprocessing)
    return info, model, backbone


def test_the_top_blocks_unfreeze_by_name_with_batchnorm_frozen(family_classifier):
    info, _, backbone = family_classifier
    blocks = residual_block_names(backbone)
    owner = block_map(backbone)
    try:
        top = unfreeze_top_blocks(backbone, 2)
        assert top == blocks[::-1][:2]
        trainable = [layer for layer in backbone.layers if layer.trainable and layer.weights]
        assert trainable, "the top blocks have weights to train"
        assert {owner[layer.name] for layer in trainable} <= set(top)
        assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in trainable)
        frozen_top = [
            layer.name for layer in backbone.layers
            if owner[layer.name] in top and layer.weights and not layer.trainable
            and not isinstance(layer, keras.layers.BatchNormalization)
        ]
        assert frozen_top == [], "every layer of an unfrozen block but BatchNorm trains"
    finally:
        unfreeze_top_blocks(backbone, 0)


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_the_cut_models_compute_the_classifier_exactly(family_classifier, depth):
    """What the feature cache stores (the frozen prefix) fed to the trainable part gives the
    classifier's own output."""
    _, model, _ = family_classifier
    images = np.random.default_rng(depth).uniform(0, 255, (4, SIZE, SIZE, 3)).astype("float32")
    features = build_feature_extractor(model, depth).predict(images, verbose=0)
    stitched = build_trainable_part(model, depth).predict(features, verbose=0)
    direct = model.predict(images, verbose=0)
    np.testing.assert_allclose(stitched, direct, rtol=1e-4, atol=1e-5)


def test_the_preprocessing_is_the_one_keras_documents_for_the_family(family_classifier):
    info, model, _ = family_classifier
    images = np.random.default_rng(1).uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")
    applied = np.asarray(model.get_layer(PREPROCESS_LAYER)(images))
    if info.preprocessing == "tf":
        expected = keras.applications.resnet_v2.preprocess_input(images.copy())
    else:  # EfficientNetV2, ConvNeXt and MobileNetV3 take 0..255 pixels and preprocess inside
        assert info.preprocessing == "none"
        expected = images
    np.testing.assert_allclose(applied, expected, rtol=1e-6, atol=1e-4)


BARE_LOAD = """
import sys
sys.modules["autofinetune"] = None  # any import of it fails
import numpy as np, keras
model = keras.saving.load_model(sys.argv[1])
images = np.load(sys.argv[2])
np.save(sys.argv[3], model.predict(images, verbose=0))
"""


def test_the_saved_classifier_loads_and_predicts_without_autofinetune(family_classifier, tmp_path):
    _, model, _ = family_classifier
    images = np.random.default_rng(2).uniform(0, 255, (3, SIZE, SIZE, 3)).astype("float32")
    model.save(tmp_path / "model.keras")
    np.save(tmp_path / "images.npy", images)
    done = subprocess.run(
        [sys.executable, "-c", BARE_LOAD, str(tmp_path / "model.keras"), str(tmp_path / "images.npy"),
         str(tmp_path / "out.npy")],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), model.predict(images, verbose=0), rtol=1e-4, atol=1e-5)
