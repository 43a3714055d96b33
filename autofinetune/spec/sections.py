"""The sections of a study spec: data, backbone, schedule, performance, cache, objective, search.

The objective's section lives in :mod:`autofinetune.spec.objectives` with the metrics it may name.

Each section is one TOML table and one immutable model; a field's checks live with the field.
:class:`~autofinetune.spec.study_spec.StudySpec` puts them together and checks them against
each other.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal, Union

from pydantic import Field, create_model, field_validator, model_validator

from autofinetune.spec.algorithms import check_name, check_options
from autofinetune.spec.base import StrictModel
from autofinetune.spec.objectives import ObjectiveSpec  # noqa: F401  (a section, re-exported)
from autofinetune.spec.params import PARAMETERS, ChoiceParam, ParamSpec, RangeParam, parse_param
from autofinetune.spec.references import ALLOWED_REFERENCE, parse_study_reference

#: ``data.source`` values that name a dataset shipped with autofinetune rather than a folder.
BUILTIN_SOURCES = ("digits", "synthetic")
MIXED_PRECISION = ("off", "mixed_float16", "mixed_bfloat16")
INPUT_PIPELINES = ("numpy", "auto", "tf_data", "py_dataset")


class AugmentationSpec(StrictModel):
    """Random augmentation applied to training images only (inside the model)."""

    flip: Literal["none", "horizontal", "vertical", "horizontal_and_vertical"] = "none"
    rotation: float = Field(0.0, ge=0.0, le=0.5, description="fraction of a full turn")
    zoom: float = Field(0.0, ge=0.0, lt=1.0)
    contrast: float = Field(0.0, ge=0.0, lt=1.0)

    @property
    def enabled(self) -> bool:
        return self.flip != "none" or self.rotation > 0 or self.zoom > 0 or self.contrast > 0


class DataSpec(StrictModel):
    """Where the images come from and how they are split and batched."""

    source: str = "digits"
    image_size: int = Field(32, ge=8, le=1024)
    validation_split: float = Field(0.2, gt=0.0, lt=1.0)
    #: Images held back from every trial (a fraction, stratified, seeded), on which the best
    #: trial's model is scored when a launch ends. 0 (the default) holds none back, as Optuna,
    #: Ray Tune and keras-tuner do: the validation split is then the only estimate.
    test_split: float = Field(0.0, ge=0.0, lt=1.0)
    #: Images held back from training and validation (a fraction of those the test split leaves,
    #: stratified, seeded) on which each finished trial's best-epoch model is scored: the study's
    #: best trial is then the one of its ``objective.final_choice_among`` best by validation that
    #: scores best here, a choice the validation split's luck did not make. 0 (the default): the
    #: best trial is the best by validation, as in Optuna, Ray Tune and keras-tuner.
    selection_split: float = Field(0.0, ge=0.0, lt=1.0)
    batch_size: int = Field(32, ge=1, le=65536)
    max_images_per_class: int | None = Field(None, ge=2)
    synthetic_classes: int = Field(3, ge=2, le=1000)
    synthetic_images_per_class: int = Field(20, ge=2)
    augmentation: AugmentationSpec = AugmentationSpec()
    #: Leave out image files that cannot be decoded (one warning, listed on the study) instead of stopping.
    skip_unreadable: bool = False

    @property
    def is_builtin(self) -> bool:
        return self.source in BUILTIN_SOURCES


class BackboneSpec(StrictModel):
    """The pretrained network and where its weights come from."""

    name: str = "resnet50"
    weights: str = Field("none", description='"imagenet", "none", or a path to a weights file')


class ScheduleSpec(StrictModel):
    """The two-phase schedule: frozen backbone + head, then fine-tune the top blocks."""

    phase1_epochs: int = Field(3, ge=1, le=10000)
    phase2_epochs: int = Field(3, ge=0, le=10000)
    phase1_optimizer: Literal["rmsprop", "sgd", "adam"] = "rmsprop"

    @property
    def total_epochs(self) -> int:
        return self.phase1_epochs + self.phase2_epochs


class PerformanceSpec(StrictModel):
    """How a trial uses the hardware; every switch is off by default.

    None of these changes what a trial searches; mixed precision changes the rounding of the
    arithmetic, the others only how fast it runs. On a GPU, start with
    ``mixed_precision = "mixed_bfloat16"`` (Ampere or newer) or ``"mixed_float16"`` (older
    cards; the loss is scaled automatically), ``jit_compile = true`` on TensorFlow, and
    ``input_pipeline = "auto"``; raise ``data.batch_size`` until the card's memory is used.

    Attributes:
        mixed_precision: ``"off"`` (float32), ``"mixed_float16"`` or ``"mixed_bfloat16"``:
            Keras's dtype policy for the trial; variables and the softmax stay float32.
        jit_compile: ``true`` / ``false`` / ``"auto"``: XLA compilation of the train step,
            passed to ``model.compile``. ``"auto"`` is Keras's own choice (XLA on a
            TensorFlow GPU and always on JAX, never on a TensorFlow CPU); ``false`` on JAX
            runs the steps un-jitted, which is slow.
        input_pipeline: ``"numpy"`` (``model.fit`` on the arrays), ``"tf_data"`` (a tf.data
            pipeline with parallel batch gathering and prefetch; needs TensorFlow),
            ``"py_dataset"`` (a ``keras.utils.PyDataset`` whose worker threads build batches
            ahead; any backend) or ``"auto"`` (``tf_data`` on TensorFlow, else ``py_dataset``).
        input_workers: Threads that build batches ahead for ``py_dataset`` (1 = none).
        image_cache: Keep the decoded, resized images of an image folder in a memory-mapped
            ``.npy`` file, so the next trial process skips decoding. Rebuilt when a file's
            name, size or modification time changes. Builtin sources ignore it.
        image_cache_dir: Folder of that cache, relative to the spec file unless absolute.
    """

    mixed_precision: Literal["off", "mixed_float16", "mixed_bfloat16"] = "off"
    jit_compile: Union[bool, Literal["auto"]] = "auto"
    input_pipeline: Literal["numpy", "auto", "tf_data", "py_dataset"] = "numpy"
    input_workers: int = Field(4, ge=1, le=64)
    image_cache: bool = False
    image_cache_dir: str = Field("autofinetune-cache/images", min_length=1)

    @field_validator("jit_compile", mode="before")
    @classmethod
    def _jit_choice(cls, value: Any) -> bool | str:
        # A string "true" would pass pydantic's lax bool parsing; TOML has real booleans.
        if isinstance(value, bool) or value == "auto":
            return value
        raise ValueError('allowed: true, false or "auto"')


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_size(value: Any) -> int:
    """A number of bytes from an integer or a size string such as ``"500 MB"`` or ``"20 GiB"``.

    Raises:
        ValueError: the value is neither (the message says what is allowed).
    """
    # The spec's error formatter puts "got <value>;" in front of the message.
    allowed = 'allowed: a number of bytes (>= 0) or a size such as "500 MB" or "20 GiB"'
    if isinstance(value, bool):
        raise ValueError(allowed)
    if isinstance(value, int):
        if value < 0:
            raise ValueError(allowed)
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        unit = (match.group(2) or "B").lower() if match else ""
        if match and unit in _SIZE_UNITS:
            return int(float(match.group(1)) * _SIZE_UNITS[unit])
    raise ValueError(allowed)


class CacheSpec(StrictModel):
    """The frozen-feature cache (see :mod:`autofinetune.trial.features`).

    Phase 1 trains the head on backbone features computed once per study, phase 2 trains the
    unfrozen blocks on cached activations of the frozen blocks below them. It turns itself off
    for a phase where it would not be exact (random augmentation on).
    """

    enabled: bool = True
    #: Cache folder; relative to the spec file. ``None``: ``autofinetune-cache/`` in the working
    #: directory, beside the default SQLite study database.
    dir: str | None = None
    #: Store features as float16: half the disk and memory, no longer bit-exact.
    float16: bool = False
    #: Disk budget in bytes (or a size such as ``"20 GiB"``); least recently used entries go first.
    max_bytes: int = 10 * 2**30

    @field_validator("max_bytes", mode="before")
    @classmethod
    def _parse_size(cls, value: Any) -> int:
        return parse_size(value)


class SearchSettings(StrictModel):
    """The ``[search]`` section but its space: how many trials, which sampler and pruner, how
    workers keep alive; :data:`SearchSpec` adds one field per searchable parameter."""

    n_trials: int = Field(12, ge=1, le=1_000_000)
    sampler: str = "tpe"
    pruner: str = "hyperband"
    sampler_options: dict[str, Any] = Field(default_factory=dict)
    pruner_options: dict[str, Any] = Field(default_factory=dict)
    baseline_trial: bool = True
    keep_checkpoints: int = Field(3, ge=0, description="best trials whose model is kept")
    heartbeat_interval: int = Field(10, ge=1, description="seconds between a running trial's heartbeats")
    heartbeat_grace: int = Field(60, ge=2, description="seconds without heartbeat before a trial is stale")
    max_retries: int = Field(2, ge=0, description="retries of a trial whose worker died")
    # A managed PostgreSQL failover takes a minute or two; a restart, seconds.
    outage_grace: int = Field(
        300, ge=0, description="seconds the study database may be unreachable before the search stops"
    )
    # 50: a fresh worker costs ~10 s (imports, backbone, first traces) and its kept models; a
    # ResNet50 worker grows ~16-25 MiB a trial. See docs/benchmarks/search_overhead.md.
    trials_per_process: int = Field(
        50, ge=1, description="trials a worker process runs before it is replaced (keeps memory bounded)"
    )
    #: Earlier studies (``NAME`` in the same database, or ``NAME@URL``) a new study starts from:
    #: their best configurations run after the baseline, and the sampler learns from their trials
    #: (see :mod:`autofinetune.search.warm_start`).
    warm_start: tuple[str, ...] = Field(default=(), description="earlier studies to start from: NAME or NAME@URL")
    warm_start_trials: int = Field(
        3, ge=0, le=1000, description="best configurations of the warm-start studies queued, in all, after the baseline"
    )

    # The space's fields are SearchSpec's; their values are parsed here, where the rule lives.
    @field_validator(*PARAMETERS, mode="before", check_fields=False)
    @classmethod
    def _parse_params(cls, raw: Any, info: Any) -> ChoiceParam | RangeParam:
        return parse_param(info.field_name, raw)

    @field_validator("warm_start", mode="before")
    @classmethod
    def _study_references(cls, value: Any) -> tuple[str, ...]:
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, (list, tuple)) or not all(isinstance(text, str) for text in value):
            raise ValueError(f"search.warm_start: got {value!r}; give a list of {ALLOWED_REFERENCE}")
        parsed: list[str] = []
        for text in value:
            try:
                parsed.append(str(parse_study_reference(text)))
            except ValueError as error:
                raise ValueError(f"search.warm_start: {error}") from None
        repeated = sorted({text for text in parsed if parsed.count(text) > 1})
        if repeated:
            raise ValueError(f"search.warm_start: {repeated[0]!r} is given twice; name each study once")
        return tuple(parsed)

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, value: str) -> str:
        return check_name("sampler", value)

    @field_validator("pruner")
    @classmethod
    def _known_pruner(cls, value: str) -> str:
        return check_name("pruner", value)

    @model_validator(mode="after")
    def _check_options(self) -> "SearchSettings":
        check_options("sampler", self.sampler, self.sampler_options)
        check_options("pruner", self.pruner, self.pruner_options)
        if self.heartbeat_grace <= self.heartbeat_interval:
            raise ValueError(
                f"search.heartbeat_grace: got {self.heartbeat_grace}; it must be larger than "
                f"search.heartbeat_interval ({self.heartbeat_interval})"
            )
        return self

    def params(self) -> dict[str, ChoiceParam | RangeParam]:
        """The search space, parameter name -> its space, in the declaration's order."""
        return {name: getattr(self, name) for name in PARAMETERS}


if TYPE_CHECKING:
    # Type checkers see the settings; the space is read through params().
    SearchSpec = SearchSettings
else:
    #: The ``[search]`` section: :class:`SearchSettings` and one field per searchable parameter of
    #: :class:`~autofinetune.spec.params.TrialParams`, whose default is that parameter's default
    #: space (a field made from the declaration, never written twice).
    SearchSpec = create_model(
        "SearchSpec",
        __base__=SearchSettings,
        __module__=__name__,
        __doc__="How many trials, which sampler and pruner, and the space they search.",
        **{
            name: (ParamSpec, Field(default=parameter.default_space, description=parameter.doc))
            for name, parameter in PARAMETERS.items()
        },
    )
