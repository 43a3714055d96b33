"""Study specs: the shipped ones load, and bad ones fail with errors that name the problem."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from autofinetune.cli import main
from autofinetune.spec import ChoiceParam, RangeParam, load_spec, parse_spec
from autofinetune.errors import ConfigError

from conftest import REPO_ROOT, tiny_spec_dict, write_spec


@pytest.mark.parametrize("name", ["digits-demo.toml", "resnet50-imagefolder.toml", "pick-backbone.toml"])
def test_shipped_specs_load(name, tmp_path):
    spec_path = REPO_ROOT / "studies" / name
    if name != "digits-demo.toml":
        # Its image folder is the user's; give it one so validation can pass.
        from autofinetune.data.sources import synthetic_images, write_image_folder

        x, y, names = synthetic_images(8, 2, 2, seed=0)
        text = spec_path.read_text().replace('source = "images" ', f'source = "{tmp_path / "images"}" ')
        text = text.replace('source = "images"\n', f'source = "{tmp_path / "images"}"\n')
        write_image_folder(tmp_path / "images", x, y, names)
        spec_path = tmp_path / name
        spec_path.write_text(text)
    spec = load_spec(spec_path)
    assert spec.search.n_trials >= 1
    assert spec.backbone_choices[0] == "resnet50"


def test_params_parse_into_choices_and_ranges(tiny_spec):
    spec = tiny_spec(search={"phase2_lr": {"low": 1e-5, "high": 1e-3, "log": True}, "dropout": 0.2})
    assert spec.search.head_units == ChoiceParam(choices=(8, 16))
    assert spec.search.phase2_lr == RangeParam(low=1e-5, high=1e-3, log=True)
    assert spec.search.unfreeze_depth.integer
    assert spec.search.dropout == ChoiceParam(choices=(0.2,))
    assert spec.objective.resolved_direction == "maximize"


BAD_SPECS = [
    ({"data": {"colour": "blue"}}, ["data.colour", "unknown field", "allowed:", "image_size"]),
    ({"optimizer": "adam"}, ["optimizer", "unknown field"]),
    ({"data": {"image_size": "big"}}, ["data.image_size", "'big'", "integer"]),
    ({"schedule": {"phase1_epochs": -2}}, ["schedule.phase1_epochs", "-2", "greater than or equal to 1"]),
    ({"schedule": {"phase2_epochs": -1}}, ["schedule.phase2_epochs", "-1"]),
    (
        {"search": {"phase1_lr": {"low": 0.1, "high": 0.01}}},
        ["search.phase1_lr", "low <= high", "low=0.1", "high=0.01"],
    ),
    ({"search": {"phase2_momentum": {"low": 0.5, "high": 1.5}}}, ["search.phase2_momentum.high", "1.5", "[0, 1)"]),
    ({"search": {"unfreeze_depth": {"low": 0, "high": 20}}}, ["search.unfreeze_depth", "20", "[0, 16]"]),
    ({"search": {"head_units": [16, 0]}}, ["search.head_units", "0", "integer in [1, 65536]"]),
    ({"search": {"head_units": 1_000_000_000}}, ["search.head_units", "1000000000", "integer in [1, 65536]"]),
    (
        {"search": {"phase1_momentum": {"low": 0.0, "high": 0.9, "step": 1.0}}},
        ["search.phase1_momentum.step", "1.0", "at most high - low (0.9)"],
    ),
    ({"search": {"sampler": "annealing"}}, ["search.sampler", "annealing", "tpe", "cmaes"]),
    ({"search": {"pruner": "patient"}}, ["search.pruner", "patient", "hyperband", "median"]),
    ({"backbone": {"name": "resnet9000"}}, ["backbone.name", "resnet9000", "resnet50", "tiny_resnet"]),
    ({"backbone": {"weights": "missing.weights.h5"}}, ["backbone.weights", "missing.weights.h5", "imagenet"]),
    ({"name": "bad name!"}, ["name", "bad name!"]),
    ({"cache": {"max_bytes": "lots"}}, ["cache.max_bytes", "'lots'", '"20 GiB"']),
    ({"cache": {"enable": False}}, ["cache.enable", "unknown field", "enabled, dir, float16, max_bytes"]),
]


@pytest.mark.parametrize("overrides, expected", BAD_SPECS, ids=[str(i) for i in range(len(BAD_SPECS))])
def test_bad_spec_names_field_value_and_rule(overrides, expected, tmp_path):
    path = write_spec(tmp_path, tiny_spec_dict(**overrides))
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    message = str(info.value)
    assert str(path) in message
    for part in expected:
        assert part in message, f"{part!r} missing from: {message}"


def test_a_key_given_twice_is_named_with_its_table_and_line(tmp_path):
    path = tmp_path / "twice.toml"
    path.write_text('name = "twice"\n\n[search]\nn_trials = 3\nphase1_lr = [0.001]\nphase1_lr = [0.01]\n')
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    assert str(info.value) == (
        f"{path}: not valid TOML: search.phase1_lr is given twice (the second time at line 6); TOML allows each "
        "key once: keep one of them"
    )


def _folder_spec(tmp_path, folder) -> dict:
    return tiny_spec_dict(data={"source": str(folder)})


def test_missing_image_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"data.source: image folder '.*nowhere' does not exist"):
        parse_spec(_folder_spec(tmp_path, tmp_path / "nowhere"))


def test_image_folder_with_one_class(tmp_path):
    from autofinetune.data.sources import synthetic_images, write_image_folder

    x, y, _ = synthetic_images(8, 2, 2, seed=0)
    write_image_folder(tmp_path / "images", x[y == 0], y[y == 0], ["cats"])
    with pytest.raises(ConfigError, match=r"has 1 class sub-folder\(s\) \('cats'\); it needs at least 2"):
        parse_spec(_folder_spec(tmp_path, tmp_path / "images"))


def test_image_folder_with_an_empty_class(tmp_path):
    from autofinetune.data.sources import synthetic_images, write_image_folder

    x, y, _ = synthetic_images(8, 2, 2, seed=0)
    write_image_folder(tmp_path / "images", x, y, ["cats", "dogs"])
    (tmp_path / "images" / "eels").mkdir()
    with pytest.raises(ConfigError, match=r"class folder '.*eels' holds no image"):
        parse_spec(_folder_spec(tmp_path, tmp_path / "images"))


def test_not_toml(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("name = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_spec(path)


def test_cli_bad_spec_exits_2_with_the_reason(tmp_path):
    path = write_spec(tmp_path, tiny_spec_dict(schedule={"phase1_epochs": 0}))
    result = CliRunner().invoke(main, ["run-trial", str(path)])
    assert result.exit_code == 2
    assert "schedule.phase1_epochs" in result.output
    assert "got 0" in result.output


def test_cli_bad_param_exits_2(tmp_path):
    path = write_spec(tmp_path, tiny_spec_dict())
    result = CliRunner().invoke(main, ["run-trial", str(path), "--param", "phase2_momentum=1.2"])
    assert result.exit_code == 2
    assert "phase2_momentum" in result.output and "1.2" in result.output
    result = CliRunner().invoke(main, ["run-trial", str(path), "--param", "width=3"])
    assert result.exit_code == 2
    assert "unknown parameter 'width'" in result.output
