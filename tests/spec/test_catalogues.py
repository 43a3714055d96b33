"""The catalogues of what a spec may name: backbones, samplers and pruners.

The spec checks names against them without Keras; the trial layer adds a factory per backbone.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from autofinetune.errors import ConfigError
from autofinetune.spec import parse_spec
from autofinetune.spec.algorithms import PRUNERS, SAMPLERS, pruner_class, sampler_class
from autofinetune.spec.backbones import BackboneInfo, get_backbone_info, register_backbone_info

from conftest import tiny_spec_dict


@pytest.fixture(autouse=True)
def _registries_restored():
    """Backbones registered by a test stay out of the other tests of the process."""
    from autofinetune.spec.backbones import backbone_names
    from autofinetune.trial.backbones import unregister_backbone

    before = set(backbone_names())
    yield
    for name in set(backbone_names()) - before:
        unregister_backbone(name)


def test_every_catalogued_sampler_and_pruner_is_an_optuna_class():
    import optuna

    assert all(issubclass(sampler_class(name), optuna.samplers.BaseSampler) for name in SAMPLERS)
    assert all(issubclass(pruner_class(name), optuna.pruners.BasePruner) for name in PRUNERS)


def test_a_backbone_in_the_catalogue_needs_a_factory_to_be_built():
    from autofinetune.trial.backbones import build_backbone

    register_backbone_info(
        BackboneInfo(name="catalogue_only", num_blocks=2, min_image_size=8, has_imagenet_weights=False, description="")
    )
    spec = parse_spec(tiny_spec_dict(backbone={"name": "catalogue_only"}, search={"unfreeze_depth": [0, 2]}))
    assert spec.backbone.name == "catalogue_only"
    with pytest.raises(ConfigError, match="catalogue_only.*no factory.*register_backbone"):
        build_backbone("catalogue_only", image_size=8)


def test_registering_a_backbone_adds_its_entry_and_its_factory():
    from autofinetune.trial.backbones import build_backbone, register_backbone, unregister_backbone

    info = BackboneInfo(name="two_blocks", num_blocks=2, min_image_size=8, has_imagenet_weights=False, description="")
    built = []
    register_backbone(info, factory=lambda *, image_size, weights: built.append((image_size, weights)) or "model")
    assert get_backbone_info("two_blocks") == info
    with pytest.raises(ConfigError, match="search.unfreeze_depth.*two_blocks.*2 blocks"):
        parse_spec(tiny_spec_dict(backbone={"name": "two_blocks"}, search={"unfreeze_depth": [0, 3]}))
    assert build_backbone("two_blocks", image_size=16) == "model"
    assert built == [(16, None)]
    with pytest.raises(ValueError, match="already registered"):
        register_backbone(info, factory=lambda **_: None)
    unregister_backbone("two_blocks")
    with pytest.raises(ConfigError, match="unknown backbone 'two_blocks'"):
        get_backbone_info("two_blocks")
    with pytest.raises(ValueError, match="'resnet50' is built in"):
        unregister_backbone("resnet50")


def test_checking_a_spec_imports_neither_keras_nor_the_trial_layer():
    code = (
        "import sys\n"
        "from autofinetune.spec import parse_spec\n"
        "parse_spec({'name': 'x', 'data': {'source': 'synthetic'}, 'backbone': {'name': 'tiny_resnet'}})\n"
        "print(sorted(m for m in sys.modules if m == 'keras' or m.startswith('autofinetune.trial.')"
        " and m != 'autofinetune.trial.results'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
