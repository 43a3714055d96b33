"""Training throughput of the two-phase schedule's steps, with each performance switch on and off.

Measures images/s of phase 1 (frozen backbone, head trained) and phase 2 (top ``k`` residual
blocks unfrozen) for ResNet50 at 224x224, fed from synthetic images held in memory and from
an image folder (decoded through ``load_data`` and its image cache), for every combination of
the given precisions, XLA settings and input pipelines. Each timed row runs its warm-up steps
first (compilation, tracing, the first transfers) and times only the steps after them.

The ratio column compares with a reference ceiling: NVIDIA's published ResNet-50 v1.5
training throughput of 2375 images/s on one A100 40GB with mixed precision and XLA
(TensorFlow, DeepLearningExamples, batch 256, all layers trained). Phase 1 trains only the
head, so it may go past it; phase 2 at depth 16 is the closest to the reference's work.

    python benchmarks/gpu_throughput.py                       # on a GPU: 224x224, the full matrix
    python benchmarks/gpu_throughput.py --dry-run             # CPU check at 32x32 (auto without a GPU)
    KERAS_BACKEND=jax python benchmarks/gpu_throughput.py --max-seconds 270 --out table.txt

With ``KERAS_BACKEND=jax`` nothing here imports TensorFlow, so it runs on a machine that has
JAX but no TensorFlow.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Runnable as a plain script from a checkout: the package is found next to this folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

#: NVIDIA DeepLearningExamples, TensorFlow ResNet-50 v1.5, 1x A100 40GB, batch 256, AMP + XLA.
REFERENCE_IMAGES_PER_SECOND = 2375.0
REFERENCE = (
    "NVIDIA DeepLearningExamples, TensorFlow ResNet-50 v1.5 training, 1x A100 40GB, "
    "batch 256, mixed precision + XLA: 2375 images/s"
)
NUM_CLASSES = 10
HEAD_UNITS = 1024


@dataclass(frozen=True)
class Phase:
    """A phase of the schedule as the benchmark runs it."""

    label: str
    depth: int | None  # None: phase 1 (frozen backbone); else blocks unfrozen in phase 2

    @staticmethod
    def parse(text: str) -> "Phase":
        """``"1"`` -> phase 1; ``"2:3"`` -> phase 2 with the top 3 blocks unfrozen."""
        if text == "1":
            return Phase("1", None)
        head, _, depth = text.partition(":")
        if head == "2" and depth.isdigit():
            return Phase(f"2 (depth {int(depth)})", int(depth))
        raise argparse.ArgumentTypeError(f"phase {text!r}: expected '1' or '2:<depth>', e.g. 2:3")


@dataclass
class Row:
    """One measured (or skipped, or failed) combination."""

    phase: str
    precision: str
    jit: str
    pipeline: str
    source: str
    trainable: int | None = None
    images_per_second: float | None = None
    ms_per_step: float | None = None
    note: str = ""


@dataclass
class Report:
    """Everything the table shows; rendered after every row so a cut-off run keeps its rows."""

    header: list[str]
    rows: list[Row] = field(default_factory=list)
    input_lines: list[str] = field(default_factory=list)
    footer: list[str] = field(default_factory=list)

    def render(self) -> str:
        from autofinetune.viewing.report import format_table

        table = format_table(
            ["phase", "trainable", "precision", "xla", "pipeline", "source", "img/s", "ms/step", "vs A100 ref", "note"],
            (
                [
                    r.phase,
                    f"{r.trainable / 1e6:.2f}M" if r.trainable is not None else None,
                    r.precision,
                    r.jit,
                    r.pipeline,
                    r.source,
                    f"{r.images_per_second:.1f}" if r.images_per_second is not None else None,
                    f"{r.ms_per_step:.1f}" if r.ms_per_step is not None else None,
                    f"{r.images_per_second / REFERENCE_IMAGES_PER_SECOND:.3f}x"
                    if r.images_per_second is not None
                    else None,
                    r.note,
                ]
                for r in self.rows
            ),
        )
        parts = [*self.header, "", table]
        if self.input_lines:
            parts += ["", *self.input_lines]
        if self.footer:
            parts += ["", *self.footer]
        return "\n".join(parts) + "\n"


# --- the machine -------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU's model name and core count."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def find_accelerator(backend: str) -> tuple[bool, str]:
    """Whether the backend sees a GPU, and the device's name, asked through that backend only.

    Args:
        backend: ``keras.backend.backend()``; only its framework is imported (never
            TensorFlow under JAX).
    """
    try:
        if backend == "jax":
            import jax

            devices = jax.devices()
            if devices and devices[0].platform != "cpu":
                return True, f"{devices[0].device_kind} ({len(devices)} device(s), JAX {jax.__version__})"
        elif backend == "tensorflow":
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
            if gpus:
                details = tf.config.experimental.get_device_details(gpus[0])
                return True, f"{details.get('device_name', gpus[0].name)} ({len(gpus)} device(s), TensorFlow {tf.__version__})"
        elif backend == "torch":
            import torch

            if torch.cuda.is_available():
                return True, f"{torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} device(s), PyTorch {torch.__version__})"
    except Exception as error:  # a broken driver must not hide the CPU run
        print(f"note: could not query the {backend} devices: {error}", file=sys.stderr)
    return False, f"CPU: {cpu_name()}"


# --- data --------------------------------------------------------------------------------


def synthetic_batchable(n: int, image_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 images and one-hot labels held in memory."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, image_size, image_size, 3), dtype=np.uint8)
    y = np.eye(NUM_CLASSES, dtype=np.float32)[rng.integers(0, NUM_CLASSES, size=n)]
    return x, y


def make_folder(root: Path, n: int, image_size: int, seed: int) -> Path:
    """Write ``n`` JPEGs a little larger than ``image_size`` (so loading also resizes)."""
    from PIL import Image

    side = folder_image_side(image_size)
    folder = root / "images"
    for label in range(NUM_CLASSES):
        (folder / f"class_{label}").mkdir(parents=True, exist_ok=True)
    base = np.linspace(0, 255, side, dtype=np.float32)

    def write(index: int) -> None:
        rng = np.random.default_rng((seed, index))
        # Smooth gradients plus noise: compresses and decodes like a photo, not like noise.
        image = base[None, :, None] * rng.uniform(0.3, 1.0, size=3) + rng.normal(0, 12, (side, side, 3))
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
            folder / f"class_{index % NUM_CLASSES}" / f"{index:06d}.jpg", quality=90
        )

    # PIL releases the GIL while encoding, so threads write in parallel.
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(write, range(n)))
    return folder


def folder_image_side(image_size: int) -> int:
    """Side of the folder's JPEGs: a little larger than the model's input, as photos are."""
    return max(image_size + 4, image_size * 8 // 7)


def load_folder(
    folder: Path, cache_dir: Path, image_size: int, backbone: str, validation_split: float
) -> tuple[Any, float]:
    """``load_data`` on the folder with the image cache on; returns (data, seconds)."""
    from autofinetune.spec import parse_spec
    from autofinetune.data.sources import load_data

    spec = parse_spec(
        {
            "name": "gpu-throughput",
            "data": {"source": str(folder), "image_size": image_size, "validation_split": validation_split},
            "backbone": {"name": backbone, "weights": "none"},
            "performance": {"image_cache": True, "image_cache_dir": str(cache_dir)},
        },
        origin="benchmark spec",
    )
    started = time.perf_counter()
    data = load_data(spec)
    return data, time.perf_counter() - started


# --- one measurement ---------------------------------------------------------------------


def time_fit(model, x: np.ndarray, y: np.ndarray, *, pipeline: str, batch_size: int, warmup: int, steps: int, workers: int) -> float:
    """Seconds of ``steps`` training steps, after ``warmup`` steps that are not timed.

    Both fits see whole batches of one shape, so the timed one never recompiles; ``fit``
    ends by reading the epoch's metrics, which waits for the device to finish.
    """
    from autofinetune.trial.inputs import make_fit_inputs

    cut = warmup * batch_size
    for part, timed in ((slice(0, cut), False), (slice(cut, cut + steps * batch_size), True)):
        inputs = make_fit_inputs(
            x[part], y[part], None, None, batch_size=batch_size, pipeline=pipeline, workers=workers, seed=0
        )
        started = time.perf_counter()
        model.fit(**inputs.fit_kwargs, epochs=1, verbose=0)
        if timed:
            return time.perf_counter() - started
    raise AssertionError("unreachable")


def build_for_phase(phase: Phase, backbone_name: str, image_size: int, switches):
    """A classifier set up like the schedule's phase (trainable blocks, optimizer); its training
    view, compiled, is returned.

    Args:
        phase: Which phase to set up.
        backbone_name: A registered backbone.
        image_size: Input pixels.
        switches: A :class:`~autofinetune.spec.PerformanceSpec`; build it inside its dtype
            policy scope.
    """
    from autofinetune.trial.backbones import build_backbone
    from autofinetune.trial.model import build_classifier, compile_for_training, freeze_backbone, make_optimizer, unfreeze_top_blocks
    from autofinetune.trial.performance import compile_options

    backbone = build_backbone(backbone_name, image_size=image_size, weights=None)
    model = build_classifier(backbone, num_classes=NUM_CLASSES, head_units=HEAD_UNITS)
    if phase.depth is None:
        freeze_backbone(backbone)
        optimizer = make_optimizer("rmsprop", learning_rate=1e-3, momentum=0.0)
    else:
        unfreeze_top_blocks(backbone, phase.depth)
        optimizer = make_optimizer("sgd", learning_rate=1e-4, momentum=0.9)
    return compile_for_training(model, optimizer, **compile_options(switches))


# --- the run -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="32x32, few steps: checks the script (automatic without a GPU)")
    parser.add_argument("--image-size", type=int, help="pixels (default 224; 32 in a dry run)")
    parser.add_argument("--batch-size", type=int, help="images per step (default 128; 8 in a dry run)")
    parser.add_argument("--warmup", type=int, help="untimed steps before each timed row (default 3; 1)")
    parser.add_argument("--steps", type=int, help="timed steps per row (default 20; 2)")
    parser.add_argument("--phases", help="comma list of 1 and 2:<depth> (default 1,2:3,2:16; dry run 1,2:3)")
    parser.add_argument(
        "--precisions",
        help="comma list of off, mixed_bfloat16, mixed_float16, most important first (default all three; dry run off,mixed_bfloat16)",
    )
    parser.add_argument("--jit", help="comma list of auto, true, false (default: false,true on TensorFlow, true on JAX; dry run auto)")
    parser.add_argument("--pipelines", default="numpy,auto", help="comma list of numpy, auto, tf_data, py_dataset (default numpy,auto)")
    parser.add_argument("--sources", default="memory,folder", help="comma list of memory, folder (default both)")
    parser.add_argument("--workers", type=int, default=4, help="py_dataset worker threads (default 4)")
    parser.add_argument("--backbone", default="resnet50", help="backbone name (default resnet50; tiny_resnet checks the script fast)")
    parser.add_argument("--max-seconds", type=float, help="start no new row after this many seconds; the rest are listed as skipped")
    parser.add_argument("--out", type=Path, help="also write the table to this file (rewritten after every row)")
    parser.add_argument("--workdir", type=Path, help="folder for the image folder and its cache (default: a temporary one)")
    return parser.parse_args(argv)


def _split(text: str, allowed: Sequence[str], what: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise SystemExit(f"error: --{what}: got {text!r}; allowed: comma list of {', '.join(allowed)}")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import keras

    backend = keras.backend.backend()
    has_gpu, device = find_accelerator(backend)
    dry = args.dry_run or not has_gpu
    image_size = args.image_size or (32 if dry else 224)
    batch_size = args.batch_size or (8 if dry else 128)
    warmup = args.warmup if args.warmup is not None else (1 if dry else 3)
    steps = args.steps or (2 if dry else 20)
    phases = [Phase.parse(p.strip()) for p in (args.phases or ("1,2:3" if dry else "1,2:3,2:16")).split(",")]
    precisions = _split(args.precisions or ("off,mixed_bfloat16" if dry else "off,mixed_bfloat16,mixed_float16"),
                        ("off", "mixed_float16", "mixed_bfloat16"), "precisions")
    default_jit = "auto" if dry else {"tensorflow": "false,true", "jax": "true"}.get(backend, "false")
    jits = _split(args.jit or default_jit, ("auto", "true", "false"), "jit")
    pipelines = _split(args.pipelines, ("numpy", "auto", "tf_data", "py_dataset"), "pipelines")
    sources = _split(args.sources, ("memory", "folder"), "sources")
    if warmup < 1 or steps < 1 or batch_size < 1:
        raise SystemExit("error: --warmup, --steps and --batch-size must be >= 1")

    from autofinetune.spec import PerformanceSpec
    from autofinetune.trial.inputs import resolve_pipeline
    from autofinetune.trial.model import count_trainable_params
    from autofinetune.trial.performance import dtype_policy_scope

    started = time.perf_counter()
    mode = "DRY RUN on CPU: checks that the benchmark works; its numbers say nothing about a GPU" if dry else "GPU run"
    report = Report(
        header=[
            f"autofinetune GPU throughput -- {mode}",
            f"device: {device}",
            f"backend: {backend}, keras {keras.__version__}, python {platform.python_version()}",
            f"model: {args.backbone} at {image_size}x{image_size}, {NUM_CLASSES} classes, head {HEAD_UNITS}; "
            f"batch {batch_size}; {warmup} warm-up step(s) untimed, then {steps} timed step(s) per row",
            f"reference ceiling: {REFERENCE}",
        ]
    )

    def emit(final: bool = False) -> None:
        text = report.render()
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text)
        if final:
            print(text, flush=True)

    needed = (warmup + steps) * batch_size
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    with tempfile.TemporaryDirectory(prefix="afn-bench-") as tmp:
        work = args.workdir or Path(tmp)
        if "memory" in sources:
            arrays["memory"] = synthetic_batchable(needed, image_size, seed=0)
        if "folder" in sources:
            # Two validation images per class (the stratified split needs one); the spare class's
            # worth keeps at least `needed` training images whichever way the split rounds.
            n_images = needed + 3 * NUM_CLASSES
            validation_split = 2 * NUM_CLASSES / n_images
            t = time.perf_counter()
            folder = make_folder(work, n_images, image_size, seed=1)
            written = time.perf_counter() - t
            cache_dir = work / "image-cache"
            data, cold = load_folder(folder, cache_dir, image_size, args.backbone, validation_split)
            _, warm = load_folder(folder, cache_dir, image_size, args.backbone, validation_split)
            x = np.ascontiguousarray(data.x_train[:needed])
            y = np.eye(NUM_CLASSES, dtype=np.float32)[data.y_train[:needed]]
            arrays["folder"] = (x, y)
            report.input_lines = [
                f"image folder: {n_images} JPEGs of {folder_image_side(image_size)}px (written in {written:.1f} s), "
                f"decoded with {os.cpu_count()} CPU core(s):",
                f"  first load_data (decode + resize + write the image cache): {n_images / cold:,.0f} images/s ({cold:.2f} s)",
                f"  second load_data (memory-mapped image cache, what the next trial process does): "
                f"{n_images / warm:,.0f} images/s ({warm:.2f} s)",
            ]

        # Precision outermost: under --max-seconds the last precision listed loses rows first.
        plan = [
            (phase, precision, jit, pipeline, source)
            for precision in precisions
            for jit in jits
            for phase in phases
            for pipeline in pipelines
            for source in sources
        ]
        failed = 0
        model_key = None
        model = None
        for phase, precision, jit, pipeline, source in plan:
            concrete = resolve_pipeline(pipeline, backend)
            row = Row(phase.label, precision, jit, concrete if pipeline == concrete else f"{concrete} (auto)", source)
            report.rows.append(row)
            if args.max_seconds is not None and time.perf_counter() - started > args.max_seconds:
                row.note = "skipped (time budget)"
                emit()
                continue
            try:
                key = (phase, precision, jit)
                if key != model_key:
                    model = None
                    # clear_session() resets the dtype policy, so it comes before the scope.
                    keras.utils.clear_session(free_memory=True)
                    switches = PerformanceSpec(mixed_precision=precision, jit_compile={"true": True, "false": False}.get(jit, jit))
                    with dtype_policy_scope(switches.mixed_precision):
                        model = build_for_phase(phase, args.backbone, image_size, switches)
                    model_key = key
                row.trainable = count_trainable_params(model)
                # The policy the layers really took: a clear_session() inside the scope would
                # silently have built a float32 model.
                row.precision = model.dtype_policy.name
                x, y = arrays[source]
                seconds = time_fit(
                    model, x, y, pipeline=concrete, batch_size=batch_size, warmup=warmup, steps=steps, workers=args.workers
                )
                row.images_per_second = steps * batch_size / seconds
                row.ms_per_step = 1000 * seconds / steps
                row.jit = f"{'on' if model.jit_compile else 'off'}" + (" (auto)" if jit == "auto" else "")
            except Exception as error:  # one failing combination must not lose the others
                failed += 1
                model_key = None
                row.note = f"error: {type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
                traceback.print_exc(file=sys.stderr)
            print(f"[{time.perf_counter() - started:6.1f}s] phase {row.phase}, {precision}, xla {row.jit}, "
                  f"{row.pipeline}, {source}: {row.images_per_second or 0:.1f} img/s {row.note}", file=sys.stderr, flush=True)
            emit()

    report.footer = [
        "img/s: training images per second of the timed steps (no validation); vs A100 ref: img/s / 2375.",
        "phase 1 trains only the head (the backbone runs forward only), so it can pass the reference;",
        "phase 2 at depth 16 trains every residual block, closest to the reference's full training.",
        "source 'memory': synthetic images held in memory; 'folder': the images load_data decoded from a JPEG folder.",
    ]
    if backend == "jax" and "false" not in jits:
        report.footer.append("xla: on JAX every step is XLA-compiled; jit_compile=false (un-jitted steps) is left out unless --jit names it.")
    report.footer.append(f"total time: {time.perf_counter() - started:.0f} s; rows failed: {failed}")
    emit(final=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
