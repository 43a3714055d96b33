"""Real image folders: every image kind decodes right, junk is ignored, bad files are named at once."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
from PIL import Image

from autofinetune.data.files import LISTED_IN_MESSAGE, list_image_files, load_image
from autofinetune.data.sources import load_data, unreadable_images, write_image_folder, synthetic_images
from autofinetune.errors import ConfigError
from autofinetune.spec import parse_spec

from conftest import cli_env, tiny_spec_dict, write_spec

SIZE = 16


def _quadrants() -> np.ndarray:
    """An RGB image of four flat quadrants, so colours survive JPEG and positions show rotation."""
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    half = SIZE // 2
    image[:half, :half] = (250, 30, 30)
    image[:half, half:] = (30, 250, 30)
    image[half:, :half] = (30, 30, 250)
    image[half:, half:] = (240, 240, 240)
    return image


def _quadrant_means(array: np.ndarray) -> np.ndarray:
    half = SIZE // 2
    # The inner part of each quadrant: JPEG blurs the edges between them.
    return np.array([array[r + 2 : r + half - 2, c + 2 : c + half - 2].reshape(-1, 3).mean(axis=0)
                     for r in (0, half) for c in (0, half)])


def test_every_image_kind_decodes_to_upright_rgb(tmp_path):
    rgb = _quadrants()
    grey = np.arange(SIZE * SIZE, dtype=np.uint8).reshape(SIZE, SIZE)

    Image.fromarray(grey).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(load_image(tmp_path / "grey.png", SIZE), np.repeat(grey[..., None], 3, axis=-1))

    wide = (grey.astype(np.uint16) * 257)  # 16-bit: 0..65535 must scale back to 0..255, not clip
    Image.fromarray(wide).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    np.testing.assert_array_equal(load_image(tmp_path / "deep.png", SIZE)[..., 1], grey)

    Image.fromarray(rgb).quantize(colors=4).save(tmp_path / "palette.png")
    assert Image.open(tmp_path / "palette.png").mode == "P"
    np.testing.assert_array_equal(load_image(tmp_path / "palette.png", SIZE), rgb)

    rgba = np.dstack([rgb, np.full((SIZE, SIZE), 128, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    np.testing.assert_array_equal(load_image(tmp_path / "alpha.png", SIZE), rgb)

    for name in ("lossless.webp", "plain.tiff", "UPPER.PNG"):
        options = {"lossless": True} if name.endswith("webp") else {}
        Image.fromarray(rgb).save(tmp_path / name, **options)
        np.testing.assert_array_equal(load_image(tmp_path / name, SIZE), rgb, err_msg=name)

    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "print.JPG", quality=98)
    assert Image.open(tmp_path / "print.JPG").mode == "CMYK"
    np.testing.assert_allclose(_quadrant_means(load_image(tmp_path / "print.JPG", SIZE)), _quadrant_means(rgb), atol=12)

    # A camera stores the pixels sideways and an EXIF tag saying "rotate 90 degrees clockwise".
    sideways = Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    sideways.save(tmp_path / "phone.jpeg", quality=98, exif=exif)
    np.testing.assert_allclose(_quadrant_means(load_image(tmp_path / "phone.jpeg", SIZE)), _quadrant_means(rgb), atol=12)

    assert {p.name for p in list_image_files(tmp_path)} == {
        "grey.png", "deep.png", "palette.png", "alpha.png", "lossless.webp", "plain.tiff", "UPPER.PNG",
        "print.JPG", "phone.jpeg",
    }


def test_hidden_system_and_other_files_are_ignored_silently(tmp_path):
    x, y, names = synthetic_images(8, 2, 4, seed=0)
    folder = write_image_folder(tmp_path / "imgs", x, y, names)
    junk = folder / "class_0"
    (junk / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (junk / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (junk / "._00000.png").write_bytes(b"\0\5\26\7 AppleDouble")  # macOS resource fork, image extension
    (junk / "notes.txt").write_text("taken on Tuesday")
    (junk / ".hidden").mkdir()
    (junk / ".hidden" / "broken.png").write_bytes(b"not a png")
    spec = parse_spec(tiny_spec_dict(data={"source": str(folder), "image_size": 8}))
    assert unreadable_images(spec) == []
    data = load_data(spec)
    assert len(data.y_train) + len(data.y_val) == 8 and data.skipped == ()


def _messy_folder(root: Path, bad: int) -> tuple[Path, list[Path]]:
    """3 classes of 8 good images, then a truncated PNG, a zero-byte JPEG and ``bad - 2`` junk files."""
    x, y, names = synthetic_images(8, 3, 8, seed=1)
    folder = write_image_folder(root / "imgs", x, y, names)
    good = sorted(folder.rglob("*.png"))
    truncated = folder / "class_1" / "truncated.png"
    truncated.write_bytes(good[0].read_bytes()[:-30])
    empty = folder / "class_2" / "empty.JPG"
    empty.write_bytes(b"")
    broken = [truncated, empty]
    for i in range(bad - 2):
        path = folder / f"class_{i % 3}" / f"junk{i:02d}.jpg"
        path.write_bytes(b"\xff\xd8\xff garbage")
        broken.append(path)
    return folder, sorted(broken)


def test_every_unreadable_file_is_named_in_one_error_the_rest_in_a_file(tmp_path):
    folder, broken = _messy_folder(tmp_path, bad=25)
    spec = parse_spec(tiny_spec_dict(data={"source": str(folder), "image_size": 8}))
    for check in (unreadable_images, load_data):
        with pytest.raises(ConfigError) as caught:
            check(spec)
        message = str(caught.value)
        assert message.startswith(f"data.source: 25 unreadable image file(s) in {str(folder)!r}")
        named = [path for path in broken if f"{path}: not a readable image" in message]
        assert len(named) == LISTED_IN_MESSAGE
        assert f"{folder / 'class_2' / 'empty.JPG'}: not a readable image (empty file)" in message
        listing = re.search(r"all 25 are listed in (\S+)", message).group(1)
        assert sorted(line.split("\t")[0] for line in Path(listing).read_text().splitlines()) == [str(p) for p in broken]
        assert "set data.skip_unreadable = true (--skip-unreadable)" in message


def test_skip_unreadable_leaves_them_out_and_fingerprints_the_images_used(tmp_path, caplog):
    folder, broken = _messy_folder(tmp_path, bad=2)
    for cache in (False, True):
        spec = parse_spec(tiny_spec_dict(
            data={"source": str(folder), "image_size": 8, "skip_unreadable": True},
            performance={"image_cache": cache, "image_cache_dir": str(tmp_path / "cache")},
        ))
        assert [item.path for item in unreadable_images(spec)] == broken
        with caplog.at_level("WARNING"):
            data = load_data(spec)
        assert sorted(data.skipped) == ["class_1/truncated.png", "class_2/empty.JPG"]
        assert len(data.y_train) + len(data.y_val) == 24
        assert sum("left out 2 unreadable image file(s)" in r.getMessage() for r in caplog.records) >= 1
    again = load_data(spec)  # from the cache of the readable images
    assert again.fingerprint == data.fingerprint
    for path in broken:
        path.unlink()
    clean = load_data(parse_spec(tiny_spec_dict(data={"source": str(folder), "image_size": 8})))
    assert clean.fingerprint == data.fingerprint, "the fingerprint covers exactly the images used"


def _launch(spec: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    return subprocess.run(
        [sys.executable, "-m", "autofinetune.cli", "launch", str(spec), "--storage", url, "--gpus", "none", *extra],
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=600,
    )


def test_launch_names_bad_files_before_the_study_exists_and_skips_them_on_request(tmp_path):
    folder, broken = _messy_folder(tmp_path, bad=2)
    spec = write_spec(tmp_path, tiny_spec_dict(data={"source": str(folder)}))
    refused = _launch(spec, tmp_path)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "error: data.source: 2 unreadable image file(s)" in refused.stderr
    assert all(str(path) in refused.stderr for path in broken)
    assert not (tmp_path / "study.db").exists(), "nothing is created before the folder is known to be good"

    # --timeout 0: the study is created, its workers start no trial.
    skipped = _launch(spec, tmp_path, "--skip-unreadable", "--timeout", "0")
    assert skipped.returncode == 0, skipped.stdout + skipped.stderr
    assert skipped.stderr.count("warning: data.skip_unreadable: leaving out 2 unreadable image file(s)") == 1
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert sorted(study.user_attrs["autofinetune:unreadable_files"]) == ["class_1/truncated.png", "class_2/empty.JPG"]
    assert study.user_attrs["autofinetune:spec"]["spec"]["data"]["skip_unreadable"] is True
