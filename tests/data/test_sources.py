"""Data sources: image folders, the digits demo, synthetic images; split and fingerprint."""

from __future__ import annotations

import numpy as np
import pytest

from autofinetune.spec import parse_spec
from autofinetune.data.sources import digits_images, load_data, load_image, scan_image_folder, write_image_folder
from autofinetune.errors import ConfigError

from conftest import tiny_spec_dict


def _folder_spec(folder, **data):
    return parse_spec(tiny_spec_dict(data={"source": str(folder), "image_size": 8, **data}))


def test_digits_are_real_rgb_images_at_the_spec_size():
    x, y, names = digits_images(24)
    assert x.shape == (1797, 24, 24, 3) and x.dtype == np.uint8
    assert names == tuple("0123456789") and set(y) == set(range(10))
    assert x.max() > 200 and np.array_equal(x[..., 0], x[..., 2])


def test_image_folder_keeps_class_order_and_splits_stratified(tmp_path):
    x, y, _ = digits_images(8)
    keep = np.isin(y, [0, 1, 2])
    write_image_folder(tmp_path / "imgs", x[keep][:90], y[keep][:90], ["zero", "one", "two"])
    data = load_data(_folder_spec(tmp_path / "imgs", validation_split=0.2))

    assert data.class_names == ("one", "two", "zero")  # sorted folder names, label i = names[i]
    assert len(data.x_train) + len(data.x_val) == 90
    train_counts, val_counts = np.bincount(data.y_train), np.bincount(data.y_val)
    assert np.all(val_counts > 0) and np.all(train_counts > val_counts)
    assert data.val_files and all(f.split("/")[0] in data.class_names for f in data.val_files)
    # Labels follow the folders: every validation file's folder is its label's class name.
    for name, label in zip(data.val_files, data.y_val):
        assert name.split("/")[0] == data.class_names[label]


def test_split_and_fingerprint_are_stable_and_sensitive(tmp_path):
    x, y, names = digits_images(8)
    write_image_folder(tmp_path / "imgs", x[:60], y[:60], names)
    first, again = load_data(_folder_spec(tmp_path / "imgs")), load_data(_folder_spec(tmp_path / "imgs"))
    assert first.fingerprint == again.fingerprint
    np.testing.assert_array_equal(first.y_val, again.y_val)

    resized = load_data(_folder_spec(tmp_path / "imgs", image_size=12))
    assert resized.fingerprint != first.fingerprint

    victim = sorted((tmp_path / "imgs").rglob("*.png"))[0]
    from PIL import Image

    Image.fromarray(255 - np.asarray(Image.open(victim))).save(victim)
    assert load_data(_folder_spec(tmp_path / "imgs")).fingerprint != first.fingerprint


def test_corrupt_image_is_named(tmp_path):
    x, y, names = digits_images(8)
    write_image_folder(tmp_path / "imgs", x[:30], y[:30], names[:10])
    bad = tmp_path / "imgs" / "3" / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ConfigError, match=r"broken.png: not a readable image"):
        load_data(_folder_spec(tmp_path / "imgs"))
    with pytest.raises(ValueError, match="broken.png"):
        load_image(bad, 8)


def test_too_few_images_for_a_split(tmp_path):
    x, y, names = digits_images(8)
    write_image_folder(tmp_path / "imgs", x[y < 2][:2], np.array([0, 1]), names[:2])
    with pytest.raises(ConfigError, match="needs at least 2"):
        load_data(_folder_spec(tmp_path / "imgs"))


def test_scan_ignores_non_images_and_hidden_folders(tmp_path):
    x, y, names = digits_images(8)
    write_image_folder(tmp_path / "imgs", x[:20], y[:20], names)
    (tmp_path / "imgs" / ".cache").mkdir()
    (tmp_path / "imgs" / "0" / "notes.txt").write_text("hello")
    classes = scan_image_folder(tmp_path / "imgs")
    assert [c for c, _ in classes] == list(names)
    assert all(p.suffix == ".png" for _, files in classes for p in files)


def test_max_images_per_class_limits_every_class():
    spec = parse_spec(tiny_spec_dict(data={"source": "digits", "image_size": 8, "max_images_per_class": 5}))
    data = load_data(spec)
    counts = np.bincount(np.concatenate([data.y_train, data.y_val]))
    assert counts.tolist() == [5] * 10


def test_a_test_split_is_held_back_stratified_seeded_and_apart_from_train_and_validation(tmp_path):
    spec = parse_spec(tiny_spec_dict(name="held", data={"synthetic_images_per_class": 20, "test_split": 0.25}))
    data = load_data(spec)
    assert data.has_test_split and np.bincount(data.y_test).tolist() == [5, 5, 5]
    assert len(data.y_train) + len(data.y_val) + len(data.y_test) == 60
    seen = {image.tobytes() for image in np.concatenate([data.x_train, data.x_val])}
    assert not any(image.tobytes() in seen for image in data.x_test), "no trial trains or validates on a test image"
    again = load_data(spec)
    assert np.array_equal(again.x_test, data.x_test) and again.fingerprint == data.fingerprint
    without = load_data(parse_spec(tiny_spec_dict(name="held", data={"synthetic_images_per_class": 20})))
    assert not without.has_test_split and without.fingerprint != data.fingerprint
