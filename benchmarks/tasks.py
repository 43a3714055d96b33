"""The benchmark suite's image tasks, rendered offline, deterministically for a seed.

Each task writes an image folder (one sub-folder per class, PNG) cached by (task, image size,
seed) in the benchmark cache folder; rendering takes seconds. ``TASKS`` names each task's
generator, its role and what it is:

- *tuning* tasks are where the package's defaults may be chosen;
- *evaluation* tasks are only reported: no default is chosen by looking at them.

    python benchmarks/tasks.py                  # render every task, print counts and probe accuracy
    python benchmarks/tasks.py --backbone       # and the probe on ResNet50's features (random, stand-in)
    python benchmarks/tasks.py --image-size 32 --seed 0
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS.parent))  # this checkout's package
sys.path.insert(0, str(BENCHMARKS))

import numpy as np  # noqa: E402

from pretrain_backbone import DEFAULT_CACHE, blur_some, colourise, glyph_font_files, render_templates, warp  # noqa: E402

#: Images per class of the rendered tasks: 1,600 images, so search_quality's split (20% held back
#: for test, then 20% of the rest for validation) leaves 256 validation images (one is 0.39%).
PER_CLASS = 160
#: Upper-case Greek letters that no Latin letter looks like: the stand-in backbone was pretrained
#: on 0-9A-Za-z, so none of these is a class it has seen.
GREEK = {"Gamma": "Γ", "Delta": "Δ", "Theta": "Θ", "Lambda": "Λ", "Xi": "Ξ",
         "Pi": "Π", "Sigma": "Σ", "Phi": "Φ", "Psi": "Ψ", "Omega": "Ω"}
TEXTURES = ("stripes-000", "stripes-045", "stripes-090", "stripes-135", "checkers", "dots", "rings", "waves",
            "blobs", "grain")
SHAPES = ("circle", "ring", "square", "diamond", "triangle", "star", "plus", "frame", "crescent", "half-disc")

Images = tuple[np.ndarray, np.ndarray, tuple[str, ...]]  # uint8 (n, s, s, 3), int labels, class names


# --- generators ------------------------------------------------------------------------------------


def digits_task(image_size: int, seed: int) -> Images:
    """scikit-learn's 1,797 handwritten 8x8 digits, upscaled (a fixed set: ``seed`` changes nothing)."""
    from autofinetune.data.sources import digits_images

    del seed  # the bundled images are the task
    x, y, names = digits_images(image_size)
    return x, y, tuple(names)


def glyphs_task(image_size: int, seed: int) -> Images:
    """Ten Greek capitals in matplotlib's bundled fonts, warped, blurred and coloured as in pretraining."""
    characters = "".join(GREEK.values())
    templates, labels = render_templates(glyph_font_files(characters), characters)
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(GREEK)), PER_CLASS)
    # Each image draws one of its class's templates (one per font): classes stay balanced.
    pick = np.array([rng.choice(np.flatnonzero(labels == label)) for label in y])
    alpha = blur_some(warp(templates[pick], image_size=image_size, rng=rng), rng=rng)
    return colourise(alpha, rng=rng), y, tuple(GREEK)


def _texture(name: str, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` coverage maps (0..1) of one texture class: random period, phase, sharpness, small tilt."""
    grid = np.arange(size, dtype=np.float32) + 0.5
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    period = rng.uniform(0.12, 0.3, n)[:, None, None] * size
    phase = rng.uniform(0, 2 * np.pi, n)[:, None, None]
    sharp = rng.uniform(1, 6, n)[:, None, None]
    base = {"stripes-000": 0.0, "stripes-045": 45.0, "stripes-090": 90.0, "stripes-135": 135.0}.get(name)
    # The stripes' tilt stays within ±10°, so neighbouring orientation classes never meet.
    tilt = np.deg2rad((base if base is not None else rng.uniform(0, 180, n)[:, None, None])
                      + rng.uniform(-10, 10, n)[:, None, None])
    u = xx * np.cos(tilt) + yy * np.sin(tilt)
    v = -xx * np.sin(tilt) + yy * np.cos(tilt)
    if base is not None:
        wave = np.sin(2 * np.pi * u / period + phase)
    elif name == "checkers":
        wave = np.sin(2 * np.pi * u / period + phase) * np.sin(2 * np.pi * v / period)
    elif name == "dots":
        du, dv = (u % period) - period / 2, (v % period) - period / 2
        wave = period * rng.uniform(0.2, 0.32, n)[:, None, None] - np.hypot(du, dv)
    elif name == "rings":
        centre = rng.uniform(0, size, (n, 2))
        wave = np.sin(2 * np.pi * np.hypot(xx - centre[:, 0, None, None], yy - centre[:, 1, None, None]) / period + phase)
    elif name == "waves":
        bend = rng.uniform(0.6, 1.2, n)[:, None, None] * period
        wave = np.sin(2 * np.pi * (u + bend * np.sin(2 * np.pi * v / (2 * period))) / period + phase)
    else:  # blobs / grain: Gaussian noise with a low-pass or a flat spectrum
        freq = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij"))
        cutoff = rng.uniform(0.04, 0.08, n)[:, None, None] if name == "blobs" else np.full((n, 1, 1), 0.6)
        spectrum = np.fft.fft2(rng.normal(size=(n, size, size))) * np.exp(-(freq / cutoff) ** 2)
        wave = np.real(np.fft.ifft2(spectrum))
        wave = wave / (wave.std(axis=(1, 2), keepdims=True) + 1e-9)
    return (1 / (1 + np.exp(-sharp * wave))).astype(np.float32)


def textures_task(image_size: int, seed: int) -> Images:
    """Ten procedural textures in random colours: stripes at four angles, checkers, dots, rings, waves, noise."""
    rng = np.random.default_rng(seed)
    alpha = np.concatenate([_texture(name, PER_CLASS, image_size, rng) for name in TEXTURES])
    return colourise(alpha, rng=rng), np.repeat(np.arange(len(TEXTURES)), PER_CLASS), TEXTURES


def _shape_mask(name: str, size: int, rng: np.random.Generator):
    """A ``size`` square mask (PIL "L") of one shape at a random place, size and small rotation."""
    from PIL import Image, ImageDraw

    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = rng.uniform(0.32, 0.68, 2) * size
    r = rng.uniform(0.18, 0.3) * size
    # ±15° keeps a square (corners at 45°) and a diamond (corners at 0°) apart.
    turn = np.deg2rad(rng.uniform(-15, 15))

    def polygon(radii: list[float], start_deg: float) -> list[tuple[float, float]]:
        angles = turn + np.deg2rad(start_deg) + 2 * np.pi * np.arange(len(radii)) / len(radii)
        return [(cx + k * r * np.cos(a), cy + k * r * np.sin(a)) for k, a in zip(radii, angles)]

    box = (cx - r, cy - r, cx + r, cy + r)
    if name in ("circle", "ring", "crescent"):
        draw.ellipse(box, fill=255)
        if name != "circle":
            dx = 0 if name == "ring" else rng.choice([-1, 1]) * 0.45 * r
            k = 0.6 if name == "ring" else 0.85
            draw.ellipse((cx + dx - k * r, cy - k * r, cx + dx + k * r, cy + k * r), fill=0)
    elif name in ("square", "frame"):
        draw.polygon(polygon([1.0] * 4, 45), fill=255)
        if name == "frame":
            draw.polygon(polygon([0.6] * 4, 45), fill=0)
    elif name == "diamond":
        draw.polygon(polygon([1.0] * 4, 0), fill=255)
    elif name == "triangle":
        draw.polygon(polygon([1.0] * 3, -90), fill=255)
    elif name == "star":
        draw.polygon(polygon([1.0, 0.42] * 5, -90), fill=255)
    elif name == "plus":
        arm = 0.3 * r
        draw.rectangle((cx - r, cy - arm, cx + r, cy + arm), fill=255)
        draw.rectangle((cx - arm, cy - r, cx + arm, cy + r), fill=255)
        mask = mask.rotate(np.rad2deg(turn), center=(cx, cy), resample=Image.Resampling.BILINEAR)
    else:  # half-disc: the flat side facing a random way
        start = rng.uniform(0, 360)
        draw.pieslice(box, start, start + 180, fill=255)
    return mask


def shapes_task(image_size: int, seed: int) -> Images:
    """Ten filled shapes in random colours, places and sizes, over random lines and dots (clutter)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    big = 4 * image_size  # drawn large, then averaged down: smooth edges at any image size
    images = []
    for name in SHAPES:
        for _ in range(PER_CLASS):
            background, foreground = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
            if abs(foreground.mean() - background.mean()) < 60:  # as colourise: keep the shape visible
                foreground = 255 - background
            canvas = Image.new("RGB", (big, big), tuple(int(c) for c in background))
            draw = ImageDraw.Draw(canvas)
            for _ in range(rng.integers(3, 8)):
                colour = tuple(int(c) for c in rng.uniform(0, 255, 3))
                a, b = rng.uniform(0, big, 2), rng.uniform(0, big, 2)
                if rng.random() < 0.5:
                    draw.line((*a, *b), fill=colour, width=int(rng.integers(1, 4)))
                else:
                    draw.ellipse((*a, *(a + rng.uniform(2, 0.08 * big))), fill=colour)
            canvas.paste(tuple(int(c) for c in foreground), mask=_shape_mask(name, big, rng))
            small = np.asarray(canvas.resize((image_size, image_size), Image.Resampling.BOX), dtype=np.float32)
            images.append(small + rng.normal(0, rng.uniform(0, 12), small.shape))
    x = np.clip(np.stack(images), 0, 255).astype(np.uint8)
    return x, np.repeat(np.arange(len(SHAPES)), PER_CLASS), SHAPES


@dataclass(frozen=True)
class Task:
    """One task of the suite: how to render it, its role, and what it is."""

    generator: Callable[[int, int], Images]
    role: str  # "tuning": defaults may be chosen here; "evaluation": only reported
    description: str


TASKS: dict[str, Task] = {
    "digits": Task(digits_task, "tuning", "scikit-learn's 8x8 handwritten digits, upscaled (1,797 images)"),
    "textures": Task(textures_task, "tuning", "procedural textures: stripes at 4 angles, checkers, dots, rings, "
                                              "waves, smooth and fine noise; random period, phase, colour"),
    "glyphs": Task(glyphs_task, "evaluation", "10 Greek capitals (not in the backbone's 0-9A-Za-z) in 16 bundled "
                                              "fonts; random rotation, scale, shear, blur, colour, noise"),
    "shapes": Task(shapes_task, "evaluation", "10 filled shapes (circle, ring, square, diamond, triangle, star, "
                                              "plus, frame, crescent, half-disc); random place, size, colour, clutter"),
}


def task_folder(name: str, image_size: int, seed: int = 0, cache_dir: Path = DEFAULT_CACHE) -> Path:
    """The task's image folder, rendered into ``cache_dir`` the first time (task, size, seed) is asked for."""
    from autofinetune.data.sources import write_image_folder

    folder = cache_dir / f"task-{name}-{image_size}px-seed{seed}"
    if not folder.is_dir():
        x, y, names = TASKS[name].generator(image_size, seed)
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        write_image_folder(partial, x, y, names)
        partial.replace(folder)  # a half-written folder is never taken for a finished one
    return folder


# --- how hard is each task --------------------------------------------------------------------------


def probe_features(x: np.ndarray) -> np.ndarray:
    """Fixed features for the probe: 16x16 grey pixels (per image standardised) and their log magnitude spectrum.

    The spectrum's magnitude ignores phase, position and a foreground/background colour swap,
    which the rendered tasks randomise; what is left is each class's structure.
    """
    grey = x.astype(np.float32).mean(axis=-1)
    grey = (grey - grey.mean(axis=(1, 2), keepdims=True)) / (grey.std(axis=(1, 2), keepdims=True) + 1e-6)
    size = grey.shape[1]
    index = (np.arange(16) * size) // 16
    small = grey[:, index][:, :, index]  # sampled, not averaged: fine grain stays visible
    spectrum = np.log1p(np.abs(np.fft.fft2(small)))
    return np.concatenate([small.reshape(len(x), -1), spectrum.reshape(len(x), -1)], axis=1)


def probe_accuracy(x: np.ndarray, y: np.ndarray, seed: int = 0, features: np.ndarray | None = None) -> float:
    """Held-out accuracy (a quarter, stratified) of logistic regression on ``probe_features``.

    Args:
        features: Features of ``x`` to probe instead (a backbone's: :func:`backbone_features`).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features = probe_features(x) if features is None else features
    x_train, x_test, y_train, y_test = train_test_split(features, y, test_size=0.25, stratify=y, random_state=seed)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=300))
    return float(model.fit(x_train, y_train).score(x_test, y_test))


def frozen_resnet50(image_size: int, weights: str | None):
    """ResNet50 at ``image_size``, with ``weights`` (a weights file, or None for a seeded random init)."""
    import keras

    from autofinetune.trial.backbones import build_backbone

    keras.utils.set_random_seed(0)
    return build_backbone("resnet50", image_size=image_size, weights=weights)


def backbone_features(x: np.ndarray, backbone) -> np.ndarray:
    """The backbone's pooled features of ``x`` (uint8 images), as a frozen backbone hands them to a head."""
    from autofinetune.trial.model import caffe_preprocessing

    preprocess = caffe_preprocessing()
    batches = [np.asarray(backbone(preprocess(x[i:i + 256].astype(np.float32)), training=False))
               for i in range(0, len(x), 256)]
    features = np.concatenate(batches)
    return features.reshape(len(x), -1, features.shape[-1]).mean(axis=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.2, help="as search_quality.py's split")
    parser.add_argument("--validation-split", type=float, default=0.2, help="as the searches' study spec")
    parser.add_argument("--backbone", action="store_true",
                        help="also probe ResNet50's pooled features: random init, and the committed stand-in")
    args = parser.parse_args(argv)
    from autofinetune.viewing.report import format_table

    pretrained = None
    backbones = []  # built once, probed on every task: random init, then the committed stand-in
    if args.backbone:
        from weights_parts import committed_parts_dir, committed_weights, parts_digest

        pretrained = committed_weights(args.image_size, DEFAULT_CACHE)
        if pretrained is None:
            raise SystemExit(f"error: no stand-in backbone is committed for {args.image_size}x{args.image_size} "
                             "(benchmarks/pretrained/)")
        backbones = [frozen_resnet50(args.image_size, weights) for weights in (None, str(pretrained))]
    rows = []
    for name, task in TASKS.items():
        x, y, names = task.generator(args.image_size, args.seed)
        task_folder(name, args.image_size, args.seed)
        trainval = len(y) - sum(max(1, round(args.test_fraction * c)) for c in np.bincount(y))
        validation = math.ceil(args.validation_split * trainval)  # as train_test_split counts it
        row = [name, task.role, str(len(names)), f"{len(y):,}", str(validation), f"{100 / validation:.2f}%",
               f"{probe_accuracy(x, y):.3f}"]
        row += [f"{probe_accuracy(x, y, features=backbone_features(x, backbone)):.3f}" for backbone in backbones]
        rows.append([*row, f"{1 / len(names):.3f}"])
    header = ["task", "role", "classes", "images", "validation", "one image", "probe"]
    if pretrained is not None:
        header += ["probe: random resnet50", f"probe: stand-in {parts_digest(committed_parts_dir(args.image_size))}"]
    print(format_table([*header, "chance"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
