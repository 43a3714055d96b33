"""Carry a pretrained ``resnet50`` weights file in parts of at most 15 MB, as float16.

The benchmarks' stand-in backbone is committed this way (``benchmarks/pretrained/``), so that
every machine and every later run starts from the same weights, and a GPU machine that
pretrains it (``gpu_pretrain.sh``) can hand back small files: ResNet50's 94 MB of float32
weights would not fit. ``pack`` writes every weight as float16 (float32 where a value lies
outside float16's range) into numbered parts, with the backbone's pooled features of a fixed
random batch, and a ``SHA256SUMS`` file naming each part's hash. ``unpack`` checks every part
against it first (a part that differs is refused by name), joins them, rebuilds the
``.weights.h5`` file the benchmarks load and prints how far the rebuilt backbone's features lie
from the packed ones (float16 rounding: about 1e-3 of their scale).

    python benchmarks/weights_parts.py pack ~/.cache/autofinetune-bench/resnet50_glyphs_32.weights.h5 OUT_DIR
    python benchmarks/weights_parts.py unpack OUT_DIR ~/.cache/autofinetune-bench/resnet50_glyphs_32.weights.h5
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package

import numpy as np  # noqa: E402

PART_BYTES = 15_000_000
COMMITTED = Path(__file__).resolve().parent / "pretrained"  # the stand-in backbone, one folder a size
CHECKSUMS = "SHA256SUMS"  # one ``<sha256>  <part name>`` line a part, as ``sha256sum`` writes them
FLOAT16_MAX = float(np.finfo(np.float16).max)


def pooled_features(backbone) -> np.ndarray:
    """The backbone's pooled output for a fixed batch of random 0..255 images."""
    from autofinetune.trial.model import caffe_preprocessing

    size = backbone.input_shape[1]
    images = np.random.default_rng(0).uniform(0, 255, (16, size, size, 3)).astype(np.float32)
    features = backbone(caffe_preprocessing()(images), training=False)
    return np.asarray(features, dtype=np.float32).mean(axis=(1, 2))


def backbone_for(image_size: int, weights: str | None):
    from autofinetune.trial.backbones import build_backbone

    return build_backbone("resnet50", image_size=image_size, weights=weights)


def pack(weights_file: Path, out_dir: Path, image_size: int) -> list[Path]:
    backbone = backbone_for(image_size, str(weights_file))
    arrays = {}
    for index, value in enumerate(backbone.get_weights()):
        small = np.abs(value).max(initial=0.0) < FLOAT16_MAX
        arrays[f"w{index:04d}"] = value.astype(np.float16 if small else np.float32)
    arrays["features"] = pooled_features(backbone)
    arrays["image_size"] = np.asarray(image_size)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    data = buffer.getvalue()
    out_dir.mkdir(parents=True, exist_ok=True)
    parts, listing = [], []
    for number, start in enumerate(range(0, len(data), PART_BYTES)):
        part, chunk = out_dir / f"{weights_file.name}.part{number:02d}", data[start:start + PART_BYTES]
        part.write_bytes(chunk)
        parts.append(part)
        listing.append(f"{sha256(chunk)}  {part.name}\n")
    (out_dir / CHECKSUMS).write_text("".join(listing))
    print(f"packed {weights_file} ({len(backbone.get_weights())} arrays) into {len(parts)} parts "
          f"of {len(data) / 1e6:.1f} MB in all under {out_dir}", flush=True)
    return parts


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def checked_parts(parts_dir: Path) -> dict[Path, bytes]:
    """The parts named in ``parts_dir/SHA256SUMS`` and their contents, in order, each checked
    against its hash (read once: the check and the joining use the same bytes)."""
    listing = parts_dir / CHECKSUMS
    if not listing.is_file():
        raise SystemExit(f"error: {listing} is missing: it names each part and its SHA-256 (written by 'pack')")
    parts = {}
    for line in listing.read_text().splitlines():
        expected, name = line.split(maxsplit=1)
        part = parts_dir / name
        if not part.is_file():
            raise SystemExit(f"error: {part} is missing ({listing} names it)")
        data = part.read_bytes()
        if (actual := sha256(data)) != expected:
            raise SystemExit(f"error: {part} has SHA-256 {actual}; {listing} says {expected}: the part is "
                             "damaged or from another backbone (git LFS pointer? re-clone, or pack again)")
        parts[part] = data
    if not parts:
        raise SystemExit(f"error: {listing} names no parts")
    return parts


def parts_digest(parts_dir: Path) -> str:
    """A short name for the packed backbone: the start of the SHA-256 of its ``SHA256SUMS``."""
    return sha256((parts_dir / CHECKSUMS).read_bytes())[:12]


def committed_parts_dir(image_size: int) -> Path:
    """Where the stand-in backbone for ``image_size`` is committed (it may hold nothing)."""
    return COMMITTED / f"resnet50_glyphs_{image_size}"


def committed_weights(image_size: int, cache_dir: Path) -> Path | None:
    """The committed stand-in backbone's weights file, rebuilt into ``cache_dir`` on first use.

    Returns None when no parts are committed for ``image_size``. The file's name holds
    :func:`parts_digest`, so a backbone pretrained locally never stands in for it.
    """
    parts_dir = committed_parts_dir(image_size)
    if not (parts_dir / CHECKSUMS).is_file():
        return None
    path = cache_dir / f"resnet50_glyphs_{image_size}.{parts_digest(parts_dir)}.weights.h5"
    if not path.is_file():
        unpack(parts_dir, path)
    return path


def unpack(parts_dir: Path, weights_file: Path) -> float:
    parts = checked_parts(parts_dir)
    arrays = np.load(io.BytesIO(b"".join(parts.values())))
    image_size = int(arrays["image_size"])
    backbone = backbone_for(image_size, None)
    names = sorted(name for name in arrays.files if name.startswith("w"))
    expected = len(backbone.get_weights())
    if len(names) != expected:
        raise SystemExit(f"error: the parts hold {len(names)} arrays; resnet50 at {image_size}x{image_size} has {expected}")
    backbone.set_weights([arrays[name].astype(np.float32) for name in names])
    drift = float(np.abs(pooled_features(backbone) - arrays["features"]).max() / np.abs(arrays["features"]).max())
    weights_file.parent.mkdir(parents=True, exist_ok=True)
    partial = weights_file.with_name(weights_file.name.replace(".weights.h5", ".partial.weights.h5"))
    backbone.save_weights(str(partial))
    partial.replace(weights_file)
    print(f"rebuilt {weights_file} from {len(parts)} parts; pooled features of a fixed batch differ from the "
          f"packed backbone's by at most {drift:.2e} of their largest value", flush=True)
    return drift


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack", help="weights file -> parts")
    packing.add_argument("weights_file", type=Path)
    packing.add_argument("out_dir", type=Path)
    packing.add_argument("--image-size", type=int, default=32)
    unpacking = commands.add_parser("unpack", help="parts -> weights file")
    unpacking.add_argument("parts_dir", type=Path)
    unpacking.add_argument("weights_file", type=Path)
    args = parser.parse_args(argv)
    if args.command == "pack":
        pack(args.weights_file, args.out_dir, args.image_size)
    else:
        unpack(args.parts_dir, args.weights_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
