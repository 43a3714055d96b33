"""Pretrain the ``resnet50`` backbone on rendered glyphs, so benchmarks start where users start.

Users fine-tune a pretrained backbone; ImageNet weights cannot be downloaded here. This script
makes a stand-in: Keras's ResNet50 (exactly what ``build_backbone("resnet50", ...)`` builds),
trained from random initialisation to classify the 62 letters and digits (0-9, A-Z, a-z)
rendered in every text font matplotlib bundles (22 files: DejaVu Sans, Serif and Mono in
their bold and oblique styles, STIX General, Computer Modern roman/sans/typewriter/italic), with random rotation, scale,
translation, blur, foreground/background colours and noise.

The source task contains the digits 0-9 in printed fonts; the benchmarks' target (scikit-learn's
8x8 handwritten digits, upscaled) is another domain, much as ImageNet contains classes related
to many fine-tuning targets.

It trains for a fixed number of minutes (Adam, warm-up then cosine decay over the wall-clock
budget, every residual block starting as identity), prints the accuracy on a held-back split of
the source task, and saves the headless backbone's weights once into a cache folder (reused
when present): ``backbone.weights = "<that file>"`` in a study spec loads them through the real
weights-file route. The rendered images are cached there too, as ``.npy``.

The benchmarks do not run this: they start from the stand-in committed under
``benchmarks/pretrained/`` (``weights_parts.py``), so that every machine starts from the same
weights. Run it to remake that stand-in, then pack it there.

    python benchmarks/pretrain_backbone.py                 # 60 minutes of training, 32x32
    python benchmarks/pretrain_backbone.py --minutes 2 --force
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow's oneDNN kernels, as every search runs them (why: quality_searches.py).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package

import numpy as np  # noqa: E402

CHARACTERS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
DEFAULT_CACHE = Path.home() / ".cache" / "autofinetune-bench"
TEMPLATE_SIZE = 64  # glyphs are rendered once at this size, then warped down to the image size
#: Bundled fonts whose letters are not letters: TeX's math-extension and symbol fonts map the
#: ASCII code points to symbols, and LastResort draws one placeholder for every character.
NOT_TEXT_FONTS = frozenset({"cmex10.ttf", "cmsy10.ttf", "LastResortHE-Regular.ttf"})


def weights_path(cache_dir: Path, image_size: int) -> Path:
    """Where the pretrained backbone of ``image_size`` lives in ``cache_dir``."""
    return cache_dir / f"resnet50_glyphs_{image_size}.weights.h5"


# --- the source task -------------------------------------------------------------------------


def glyph_font_files(characters: str = CHARACTERS) -> list[Path]:
    """matplotlib's bundled text fonts that have a glyph for each of ``characters`` (the 62)."""
    import matplotlib
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    font_dir = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    paths = sorted({Path(p) for p in font_manager.findSystemFonts(fontpaths=[str(font_dir)])})
    usable = []
    for path in paths:
        if path.name in NOT_TEXT_FONTS:
            continue
        try:
            font = FT2Font(str(path))
        except Exception:  # a file FreeType cannot read is simply not a source
            continue
        if all(font.get_char_index(ord(ch)) for ch in characters):
            usable.append(path)
    return usable


def render_templates(fonts: list[Path], characters: str = CHARACTERS) -> tuple[np.ndarray, np.ndarray]:
    """Every character in every font, centred on a ``TEMPLATE_SIZE`` square, as coverage 0..1.

    Returns:
        ``(templates, labels)``: float32 ``(n, T, T)`` and int32 ``(n,)`` (index into ``characters``).
    """
    from PIL import Image, ImageDraw, ImageFont

    size = TEMPLATE_SIZE
    templates, labels = [], []
    for path in fonts:
        font = ImageFont.truetype(str(path), int(size * 0.7))
        for label, ch in enumerate(characters):
            canvas = Image.new("L", (size * 2, size * 2), 0)
            ImageDraw.Draw(canvas).text((size // 2, size // 2), ch, fill=255, font=font)
            box = canvas.getbbox()
            if box is None:
                continue
            glyph = canvas.crop(box)
            # Fit the glyph's longer side to 80% of the template, keeping its aspect ratio.
            scale = 0.8 * size / max(glyph.size)
            glyph = glyph.resize((max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))),
                                 Image.Resampling.BILINEAR)
            template = Image.new("L", (size, size), 0)
            template.paste(glyph, ((size - glyph.width) // 2, (size - glyph.height) // 2))
            templates.append(np.asarray(template, dtype=np.float32) / 255.0)
            labels.append(label)
    return np.stack(templates), np.asarray(labels, dtype=np.int32)


def warp(templates: np.ndarray, *, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Random rotation (±25°), scale (0.6-1.15), shear and translation, sampled bilinearly.

    Vectorised: one inverse affine map per image applied to the whole output grid at once.
    """
    n, t = templates.shape[0], templates.shape[1]
    angle = np.deg2rad(rng.uniform(-25, 25, n))
    scale = rng.uniform(0.6, 1.15, n)
    shear = rng.uniform(-0.25, 0.25, n)
    shift = rng.uniform(-0.15, 0.15, (n, 2)) * t
    # Output pixel centres, in template coordinates centred on the middle.
    coords = (np.arange(image_size) + 0.5) * (t / image_size) - t / 2
    gy, gx = np.meshgrid(coords, coords, indexing="ij")
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    inv = 1.0 / scale[:, None, None]
    ox, oy = gx[None] - shift[:, 0, None, None], gy[None] - shift[:, 1, None, None]
    sx = inv * (cos * ox + sin * oy) + shear[:, None, None] * oy * inv
    sy = inv * (-sin * ox + cos * oy)
    sx, sy = sx + t / 2 - 0.5, sy + t / 2 - 0.5
    x0, y0 = np.floor(sx).astype(np.int64), np.floor(sy).astype(np.int64)
    fx, fy = (sx - x0).astype(np.float32), (sy - y0).astype(np.float32)
    index = np.arange(n)[:, None, None]

    def at(yy, xx):
        inside = (yy >= 0) & (yy < t) & (xx >= 0) & (xx < t)
        return np.where(inside, templates[index, np.clip(yy, 0, t - 1), np.clip(xx, 0, t - 1)], 0.0)

    return ((1 - fy) * ((1 - fx) * at(y0, x0) + fx * at(y0, x0 + 1))
            + fy * ((1 - fx) * at(y0 + 1, x0) + fx * at(y0 + 1, x0 + 1))).astype(np.float32)


def blur_some(alpha: np.ndarray, *, rng: np.random.Generator) -> np.ndarray:
    """Soften a third of the images by a 2x2 or 4x4 block average (low-resolution scans)."""
    n, s = alpha.shape[0], alpha.shape[1]
    out = alpha.copy()
    for factor in (2, 4):
        if s % factor:
            continue
        pick = rng.random(n) < (1 / 6)
        if pick.any():
            block = alpha[pick].reshape(-1, s // factor, factor, s // factor, factor).mean(axis=(2, 4))
            out[pick] = np.repeat(np.repeat(block, factor, axis=1), factor, axis=2)
    return out


def colourise(alpha: np.ndarray, *, rng: np.random.Generator) -> np.ndarray:
    """Random foreground and background colours (at least some contrast) plus Gaussian noise."""
    n = alpha.shape[0]
    background = rng.uniform(0, 255, (n, 3))
    foreground = rng.uniform(0, 255, (n, 3))
    # Too little contrast makes a glyph invisible: push the foreground away from the background.
    weak = np.abs(foreground.mean(1) - background.mean(1)) < 60
    foreground[weak] = 255 - background[weak]
    noise = rng.normal(0, rng.uniform(0, 20, n)[:, None, None, None], (*alpha.shape, 3))
    a = alpha[..., None]
    image = background[:, None, None] * (1 - a) + foreground[:, None, None] * a + noise
    return np.clip(image, 0, 255).astype(np.uint8)


def render_glyph_set(n: int, *, image_size: int, seed: int, templates: np.ndarray,
                     labels: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """``n`` augmented glyph images (uint8 RGB) and their labels, classes balanced."""
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(templates), n)
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    for start in range(0, n, chunk):
        part = pick[start:start + chunk]
        alpha = blur_some(warp(templates[part], image_size=image_size, rng=rng), rng=rng)
        images[start:start + len(part)] = colourise(alpha, rng=rng)
    return images, labels[pick]


def glyph_dataset(cache_dir: Path, *, image_size: int, n_train: int, n_test: int, seed: int = 0):
    """The rendered source task, from ``cache_dir`` when it was rendered before.

    Returns:
        ``(x_train, y_train, x_test, y_test)``; the test images use a separate random stream.
    """
    stem = cache_dir / f"glyphs_{image_size}px_{n_train}_{n_test}_seed{seed}"
    files = [Path(f"{stem}_{part}.npy") for part in ("x_train", "y_train", "x_test", "y_test")]
    if all(f.is_file() for f in files):
        return tuple(np.load(f) for f in files)
    started = time.perf_counter()
    fonts = glyph_font_files()
    templates, labels = render_templates(fonts)
    x_train, y_train = render_glyph_set(n_train, image_size=image_size, seed=seed, templates=templates, labels=labels)
    x_test, y_test = render_glyph_set(n_test, image_size=image_size, seed=seed + 1, templates=templates, labels=labels)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for path, array in zip(files, (x_train, y_train, x_test, y_test)):
        np.save(path, array)
    print(f"rendered {n_train}+{n_test} images of {len(CHARACTERS)} characters in {len(fonts)} fonts "
          f"({len(templates)} glyph templates) in {time.perf_counter() - started:.1f} s", flush=True)
    return x_train, y_train, x_test, y_test


# --- pretraining -------------------------------------------------------------------------------


def zero_init_residuals(backbone) -> int:
    """Zero the scale of each residual block's last BatchNorm, so every block starts as identity.

    A randomly initialised ResNet50 then trains like a shallow network first (Goyal et al., 2017,
    "Accurate, Large Minibatch SGD"), and leaves chance far sooner. Returns how many were zeroed.
    """
    zeroed = 0
    for layer in backbone.layers:
        if re.fullmatch(r"conv\d_block\d+_3_bn", layer.name):
            layer.gamma.assign(np.zeros(layer.gamma.shape, dtype="float32"))
            zeroed += 1
    return zeroed


def pretrain(*, image_size: int, minutes: float, n_train: int, n_test: int, batch_size: int,
             cache_dir: Path, learning_rate: float, optimizer_name: str, zero_init: bool, seed: int = 0):
    """Train ResNet50 + a 62-way head on the glyphs for ``minutes``; returns (backbone, test accuracy).

    Args:
        learning_rate: The peak rate, reached after a warm-up over the first 5% of the budget.
        optimizer_name: ``"adam"``, or ``"sgd"`` (Nesterov momentum 0.9).
        zero_init: Start every residual block as identity (:func:`zero_init_residuals`).
    """
    import keras

    from autofinetune.trial.backbones import build_backbone
    from autofinetune.trial.model import caffe_preprocessing

    x_train, y_train, x_test, y_test = glyph_dataset(cache_dir, image_size=image_size, n_train=n_train,
                                                     n_test=n_test, seed=seed)
    keras.utils.set_random_seed(seed)
    backbone = build_backbone("resnet50", image_size=image_size, weights=None)
    if zero_init:
        print(f"zero-initialised the last BatchNorm scale of {zero_init_residuals(backbone)} residual blocks",
              flush=True)
    inputs = keras.Input((image_size, image_size, 3))
    x = caffe_preprocessing()(inputs)
    x = backbone(x)  # BatchNorm trains here: the statistics are learned on the source task
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(len(CHARACTERS), activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    steps_per_epoch = -(-len(x_train) // batch_size)
    budget_s = minutes * 60
    # Every network stays near chance for its first 20,000-30,000 images of this task (a 4-layer
    # CNN too). 4-minute runs at batch 64 on 2 CPU cores, held-back accuracy (chance 0.016):
    # Adam 1e-3 with zero-initialised residual blocks 0.042, Adam 2e-4 0.024, SGD + Nesterov
    # 0.05 0.017. With Adam 1e-3 an hour's run leaves chance after about 500 batches.
    base_lr, warmup = learning_rate, 0.05
    # Keras's JAX trainer keeps the variables in its own state during an epoch and reads them
    # back only when a callback syncs it: the rate is set every few batches, after a sync.
    on_jax = keras.backend.backend() == "jax"
    rate_every = 20
    optimizer = (keras.optimizers.Adam(base_lr) if optimizer_name == "adam"
                 else keras.optimizers.SGD(base_lr, momentum=0.9, nesterov=True))
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])

    class StopAtBudget(keras.callbacks.Callback):
        """Warms up, then cosine-decays the learning rate over the budget; stops when it is spent.

        The schedule follows wall time, not steps: how many steps fit depends on the machine.
        """

        def __init__(self):
            super().__init__()
            self.started = time.perf_counter()
            self.window = (0, 0.0, 0.0)  # batches, loss sum, accuracy sum at the last print
            self.batches = 0

        def on_train_batch_begin(self, batch, logs=None):
            if batch % rate_every:
                return
            spent = min(1.0, (time.perf_counter() - self.started) / budget_s)
            scale = spent / warmup if spent < warmup else 0.5 * (1 + np.cos(np.pi * (spent - warmup) / (1 - warmup)))
            if on_jax:
                self.model.jax_state_sync()
            self.model.optimizer.learning_rate.assign(base_lr * max(scale, 0.01))

        def on_train_batch_end(self, batch, logs=None):
            elapsed = time.perf_counter() - self.started
            self.batches += 1
            if batch % 100 == 99:
                # Keras's logs average over the epoch so far; print the last 100 batches' average.
                seen, loss_sum, accuracy_sum = batch + 1, logs["loss"] * (batch + 1), logs["accuracy"] * (batch + 1)
                last_seen, last_loss, last_accuracy = self.window if self.window[0] < seen else (0, 0.0, 0.0)
                n = seen - last_seen
                print(f"  batch {seen}: last {n} batches loss {(loss_sum - last_loss) / n:.3f} "
                      f"accuracy {(accuracy_sum - last_accuracy) / n:.3f} learning rate "
                      f"{float(self.model.optimizer.learning_rate):.2e} ({elapsed / 60:.1f} min)", flush=True)
                self.window = (seen, loss_sum, accuracy_sum)
            if elapsed > budget_s:
                self.model.stop_training = True

        def on_epoch_end(self, epoch, logs=None):
            elapsed = time.perf_counter() - self.started
            print(f"epoch {epoch + 1}: loss {logs['loss']:.3f} train accuracy {logs['accuracy']:.3f} "
                  f"({elapsed / 60:.1f} min)", flush=True)

    started = time.perf_counter()
    budget = StopAtBudget()
    model.fit(x_train, y_train, batch_size=batch_size, epochs=1000, steps_per_epoch=steps_per_epoch,
              callbacks=[budget], verbose=0)
    trained_s = time.perf_counter() - started
    _, accuracy = model.evaluate(x_test, y_test, batch_size=256, verbose=0)
    print(f"trained {trained_s / 60:.1f} min ({budget.batches} batches, {budget.batches * batch_size / trained_s:.0f} "
          f"images/s, {keras.backend.backend()}); "
          f"held-back source accuracy {accuracy:.3f} ({len(x_test)} images, chance {1 / len(CHARACTERS):.3f})",
          flush=True)
    return backbone, float(accuracy)


def ensure_pretrained(*, image_size: int, cache_dir: Path, minutes: float, n_train: int, n_test: int,
                      batch_size: int, learning_rate: float, optimizer_name: str, zero_init: bool,
                      force: bool = False) -> Path:
    """The pretrained weights file, trained first when absent (or when ``force``).

    The recipe's defaults are the command line's (:func:`main`), kept there only.
    """
    path = weights_path(cache_dir, image_size)
    if path.is_file() and not force:
        print(f"pretrained backbone: {path} (cached; --force to redo)", flush=True)
        return path
    backbone, _ = pretrain(image_size=image_size, minutes=minutes, n_train=n_train, n_test=n_test,
                           batch_size=batch_size, learning_rate=learning_rate, optimizer_name=optimizer_name, zero_init=zero_init,
                           cache_dir=cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name.replace(".weights.h5", ".partial.weights.h5"))
    backbone.save_weights(str(partial))
    partial.replace(path)  # a half-written file is never taken for a finished one
    print(f"saved {path}", flush=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--minutes", type=float, default=60.0, help="training budget (default 60)")
    parser.add_argument("--images", type=int, default=80000, help="training images to render")
    parser.add_argument("--test-images", type=int, default=4000, help="held-back images to render")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="small batches: more updates from the few images an hour of CPU allows")
    parser.add_argument("--learning-rate", type=float, default=1e-3,
                        help="the peak rate (default 1e-3)")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam",
                        help="adam, or SGD with Nesterov momentum 0.9 (default adam: it left chance sooner here)")
    parser.add_argument("--no-zero-init", dest="zero_init", action="store_false",
                        help="keep Keras's initial BatchNorm scales (1) in every residual block")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--force", action="store_true", help="pretrain again even if the file exists")
    args = parser.parse_args(argv)
    ensure_pretrained(image_size=args.image_size, cache_dir=args.cache_dir, minutes=args.minutes,
                      n_train=args.images, n_test=args.test_images, batch_size=args.batch_size,
                      learning_rate=args.learning_rate, optimizer_name=args.optimizer, zero_init=args.zero_init,
                      force=args.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
