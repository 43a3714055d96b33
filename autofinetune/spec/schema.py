"""The study spec: one TOML file that describes one study, validated before anything trains.

A spec is read with :func:`load_spec` (from a file) or :func:`parse_spec` (from a mapping).
Every problem becomes a :class:`~autofinetune.errors.ConfigError` that names the file, the
field, the value received and what is allowed. Relative paths in the spec (an image folder, a
weights file) are resolved against the folder that holds the spec file.
"""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, Mapping, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from autofinetune.errors import ConfigError

BUILTIN_SOURCES = ("digits", "synthetic")
SAMPLERS = ("tpe", "gp", "cmaes", "random", "qmc")
PRUNERS = ("hyperband", "median", "successive_halving", "percentile", "threshold", "none")
OBJECTIVE_METRICS = ("val_accuracy", "val_loss", "accuracy", "loss")
MIXED_PRECISION = ("off", "mixed_float16", "mixed_bfloat16")
INPUT_PIPELINES = ("numpy", "auto", "tf_data", "py_dataset")
DEFAULT_STORAGE = "sqlite:///autofinetune.db"


class _Strict(BaseModel):
    """Base of every spec section: unknown fields are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --- search-space parameters -------------------------------------------------------------


class ChoiceParam(_Strict):
    """A categorical parameter: one of ``choices``."""

    kind: Literal["choice"] = "choice"
    choices: tuple[Union[int, float, str, bool], ...]


class RangeParam(_Strict):
    """A numeric range with inclusive bounds; ``log`` samples on a log scale."""

    kind: Literal["range"] = "range"
    low: float
    high: float
    log: bool = False
    step: float | None = None
    integer: bool = False


ParamSpec = Annotated[Union[ChoiceParam, RangeParam], Field(discriminator="kind")]


class _ParamRule:
    """What values one searchable parameter may take."""

    def __init__(
        self,
        *,
        integer: bool,
        low: float,
        high: float = math.inf,
        high_inclusive: bool = True,
        low_inclusive: bool = True,
        default: Any,
        description: str,
    ) -> None:
        self.integer = integer
        self.low = low
        self.high = high
        self.low_inclusive = low_inclusive
        self.high_inclusive = high_inclusive
        self.default = default
        self.description = description

    def allowed(self) -> str:
        kind = "an integer" if self.integer else "a number"
        left = "[" if self.low_inclusive else "("
        right = "]" if self.high_inclusive else ")"
        high = "inf" if math.isinf(self.high) else _fmt(self.high)
        return f"{kind} in {left}{_fmt(self.low)}, {high}{right}"

    def admits(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not float(value).is_integer():
            return False
        if not math.isfinite(float(value)):
            return False
        above = value >= self.low if self.low_inclusive else value > self.low
        below = value <= self.high if self.high_inclusive else value < self.high
        return above and below


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(value)


#: Every parameter a trial takes, with its allowed values and the seed tutorial's value.
PARAM_RULES: dict[str, _ParamRule] = {
    "head_units": _ParamRule(integer=True, low=1, default=1024, description="units of the Dense head layer"),
    "unfreeze_depth": _ParamRule(
        integer=True, low=0, default=3, description="residual blocks unfrozen from the top in phase 2"
    ),
    "phase1_lr": _ParamRule(
        integer=False, low=0, low_inclusive=False, high=10, default=1e-3, description="phase-1 learning rate"
    ),
    "phase1_momentum": _ParamRule(
        integer=False, low=0, high=1, high_inclusive=False, default=0.0, description="phase-1 momentum"
    ),
    "phase2_lr": _ParamRule(
        integer=False, low=0, low_inclusive=False, high=10, default=1e-4, description="phase-2 learning rate"
    ),
    "phase2_momentum": _ParamRule(
        integer=False, low=0, high=1, high_inclusive=False, default=0.9, description="phase-2 momentum"
    ),
    "dropout": _ParamRule(
        integer=False, low=0, high=1, high_inclusive=False, default=0.0, description="dropout before the softmax"
    ),
    "label_smoothing": _ParamRule(
        integer=False, low=0, high=1, high_inclusive=False, default=0.0, description="label smoothing of the loss"
    ),
}


def _parse_param(name: str, raw: Any) -> ChoiceParam | RangeParam:
    """Turn the TOML form of a parameter (scalar, list or table) into a param spec."""
    rule = PARAM_RULES[name]
    where = f"search.{name}"
    if isinstance(raw, (ChoiceParam, RangeParam)):
        return raw
    if isinstance(raw, (list, tuple)):
        if not raw:
            raise ValueError(f"{where}: got an empty list; give at least one choice, {rule.allowed()}")
        bad = [v for v in raw if not rule.admits(v)]
        if bad:
            raise ValueError(f"{where}: choice {bad[0]!r} is not allowed; each choice must be {rule.allowed()}")
        if len(set(raw)) != len(raw):
            raise ValueError(f"{where}: choices {list(raw)!r} repeat a value; list each value once")
        values = tuple(int(v) if rule.integer else float(v) for v in raw)
        return ChoiceParam(choices=values)
    if isinstance(raw, Mapping):
        unknown = set(raw) - {"low", "high", "log", "step"}
        if unknown:
            raise ValueError(
                f"{where}: unknown key(s) {sorted(unknown)!r}; a range takes low, high, log, step"
            )
        if "low" not in raw or "high" not in raw:
            raise ValueError(f"{where}: a range needs both `low` and `high`, but got {dict(raw)!r}")
        low, high = raw["low"], raw["high"]
        for key, value in (("low", low), ("high", high)):
            if not rule.admits(value):
                raise ValueError(f"{where}.{key}: got {value!r}; must be {rule.allowed()}")
        if not low <= high:
            raise ValueError(f"{where}: `low <= high` must hold, but got (low={low!r}, high={high!r})")
        log = raw.get("log", False)
        if not isinstance(log, bool):
            raise ValueError(f"{where}.log: got {log!r}; must be true or false")
        if log and low <= 0:
            raise ValueError(f"{where}: a log range needs low > 0, but got low={low!r}")
        step = raw.get("step")
        if step is not None:
            if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0:
                raise ValueError(f"{where}.step: got {step!r}; must be a positive number")
            if log:
                raise ValueError(f"{where}: `step` and `log = true` cannot be combined (got step={step!r})")
            if rule.integer and not float(step).is_integer():
                raise ValueError(f"{where}.step: got {step!r}; must be an integer for an integer parameter")
        return RangeParam(low=low, high=high, log=log, step=step, integer=rule.integer)
    if rule.admits(raw):
        return ChoiceParam(choices=(int(raw) if rule.integer else float(raw),))
    raise ValueError(
        f"{where}: got {raw!r}; give a fixed value, a list of choices, or a table "
        f"{{ low = ..., high = ..., log = false }}, each value {rule.allowed()}"
    )


# --- sections ----------------------------------------------------------------------------


class AugmentationSpec(_Strict):
    """Random augmentation applied to training images only (inside the model)."""

    flip: Literal["none", "horizontal", "vertical", "horizontal_and_vertical"] = "none"
    rotation: float = Field(0.0, ge=0.0, le=0.5, description="fraction of a full turn")
    zoom: float = Field(0.0, ge=0.0, lt=1.0)
    contrast: float = Field(0.0, ge=0.0, lt=1.0)

    @property
    def enabled(self) -> bool:
        return self.flip != "none" or self.rotation > 0 or self.zoom > 0 or self.contrast > 0


class DataSpec(_Strict):
    """Where the images come from and how they are split and batched."""

    source: str = "digits"
    image_size: int = Field(32, ge=8, le=1024)
    validation_split: float = Field(0.2, gt=0.0, lt=1.0)
    batch_size: int = Field(32, ge=1, le=65536)
    max_images_per_class: int | None = Field(None, ge=2)
    synthetic_classes: int = Field(3, ge=2, le=1000)
    synthetic_images_per_class: int = Field(20, ge=2)
    augmentation: AugmentationSpec = AugmentationSpec()

    @property
    def is_builtin(self) -> bool:
        return self.source in BUILTIN_SOURCES


class BackboneSpec(_Strict):
    """The pretrained network and where its weights come from."""

    name: str = "resnet50"
    weights: str = Field("none", description='"imagenet", "none", or a path to a weights file')


class ScheduleSpec(_Strict):
    """The two-phase schedule: frozen backbone + head, then fine-tune the top blocks."""

    phase1_epochs: int = Field(3, ge=1, le=10000)
    phase2_epochs: int = Field(3, ge=0, le=10000)
    phase1_optimizer: Literal["rmsprop", "sgd"] = "rmsprop"

    @property
    def total_epochs(self) -> int:
        return self.phase1_epochs + self.phase2_epochs


class PerformanceSpec(_Strict):
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


class CacheSpec(_Strict):
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


class ObjectiveSpec(_Strict):
    """The metric a trial is scored by; its best epoch's value is the trial's value."""

    metric: Literal["val_accuracy", "val_loss", "accuracy", "loss"] = "val_accuracy"
    direction: Literal["maximize", "minimize"] | None = None

    @property
    def resolved_direction(self) -> Literal["maximize", "minimize"]:
        if self.direction is not None:
            return self.direction
        return "minimize" if self.metric.endswith("loss") else "maximize"

    @property
    def maximize(self) -> bool:
        """Whether a higher value is better."""
        return self.resolved_direction == "maximize"

    @property
    def mode(self) -> Literal["max", "min"]:
        """The direction as Ray Tune and keras-tuner name it."""
        return "max" if self.maximize else "min"

    def is_better(self, value: float, than: float) -> bool:
        """Whether ``value`` beats ``than`` in this direction (a tie is not better)."""
        return value > than if self.maximize else value < than

    def best(self, values: Iterable[float]) -> float | None:
        """The best finite value of ``values``; ``None`` when there is none."""
        finite = [value for value in values if math.isfinite(value)]
        if not finite:
            return None
        return max(finite) if self.maximize else min(finite)


class SearchSpec(_Strict):
    """How many trials, which sampler and pruner, and the space they search."""

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
    trials_per_process: int = Field(
        10, ge=1, description="trials a worker process runs before it is replaced (keeps memory flat)"
    )
    head_units: ParamSpec = ChoiceParam(choices=(128, 256, 512, 1024))
    unfreeze_depth: ParamSpec = RangeParam(low=0, high=6, integer=True)
    phase1_lr: ParamSpec = RangeParam(low=1e-4, high=1e-2, log=True)
    phase1_momentum: ParamSpec = RangeParam(low=0.0, high=0.95)
    phase2_lr: ParamSpec = RangeParam(low=1e-5, high=1e-3, log=True)
    phase2_momentum: ParamSpec = RangeParam(low=0.5, high=0.99)
    dropout: ParamSpec = ChoiceParam(choices=(0.0,))
    label_smoothing: ParamSpec = ChoiceParam(choices=(0.0,))

    @field_validator(*PARAM_RULES, mode="before")
    @classmethod
    def _parse_params(cls, raw: Any, info: Any) -> ChoiceParam | RangeParam:
        return _parse_param(info.field_name, raw)

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, value: str) -> str:
        if value not in SAMPLERS:
            raise ValueError(f"unknown sampler {value!r}; allowed: {', '.join(SAMPLERS)}")
        return value

    @field_validator("pruner")
    @classmethod
    def _known_pruner(cls, value: str) -> str:
        if value not in PRUNERS:
            raise ValueError(f"unknown pruner {value!r}; allowed: {', '.join(PRUNERS)}")
        return value

    @model_validator(mode="after")
    def _check_options(self) -> "SearchSpec":
        from autofinetune.search.algorithms import check_options

        check_options("sampler", self.sampler, self.sampler_options)
        check_options("pruner", self.pruner, self.pruner_options)
        if self.heartbeat_grace <= self.heartbeat_interval:
            raise ValueError(
                f"search.heartbeat_grace: got {self.heartbeat_grace}; it must be larger than "
                f"search.heartbeat_interval ({self.heartbeat_interval})"
            )
        return self

    def params(self) -> dict[str, ChoiceParam | RangeParam]:
        """The search space, parameter name -> spec, in a stable order."""
        return {name: getattr(self, name) for name in PARAM_RULES}


class StudySpec(_Strict):
    """One study: data, backbone, schedule, search space and where results go."""

    name: str = Field(..., min_length=1, max_length=128)
    seed: int = 0
    storage: str | None = None
    data: DataSpec = DataSpec()
    backbone: BackboneSpec = BackboneSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    search: SearchSpec = SearchSpec()
    objective: ObjectiveSpec = ObjectiveSpec()
    performance: PerformanceSpec = PerformanceSpec()
    cache: CacheSpec = CacheSpec()
    #: Folder the relative paths of this spec are resolved against (not part of the TOML).
    base_dir: str = Field(".", exclude=True)

    @field_validator("name")
    @classmethod
    def _name_chars(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", value):
            raise ValueError(
                f"got {value!r}; a study name uses letters, digits, '_', '.', '-' and starts with a letter or digit"
            )
        return value

    @model_validator(mode="after")
    def _check_against_backbone(self) -> "StudySpec":
        from autofinetune.trial.backbones import get_backbone_info

        info = get_backbone_info(self.backbone.name)  # raises a ConfigError listing valid names
        depth = self.search.unfreeze_depth
        highest = max(depth.choices) if isinstance(depth, ChoiceParam) else depth.high
        if highest > info.num_blocks:
            raise ValueError(
                f"search.unfreeze_depth: got up to {_fmt(highest)}; backbone {info.name!r} has "
                f"{info.num_blocks} residual blocks, so the depth must be in [0, {info.num_blocks}]"
            )
        if self.data.image_size < info.min_image_size:
            raise ValueError(
                f"data.image_size: got {self.data.image_size}; backbone {info.name!r} needs at least "
                f"{info.min_image_size} pixels"
            )
        return self

    # -- resolved paths -----------------------------------------------------------------

    def resolve_path(self, value: str) -> Path:
        """A path from the spec, relative to the spec file's folder unless absolute."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else (Path(self.base_dir) / path)

    @property
    def image_folder(self) -> Path | None:
        """The image folder of the spec, or ``None`` for a builtin source."""
        return None if self.data.is_builtin else self.resolve_path(self.data.source)

    @property
    def image_cache_folder(self) -> Path | None:
        """Where decoded images of the image folder are cached, or ``None`` when off."""
        if not self.performance.image_cache or self.data.is_builtin:
            return None
        return self.resolve_path(self.performance.image_cache_dir)

    @property
    def weights_path(self) -> Path | None:
        """The weights file of the spec, or ``None`` for "imagenet" / "none"."""
        if self.backbone.weights in ("imagenet", "none"):
            return None
        return self.resolve_path(self.backbone.weights)

    @property
    def cache_dir(self) -> Path | None:
        """The cache folder the spec names, or ``None`` for the default."""
        return None if self.cache.dir is None else self.resolve_path(self.cache.dir)

    def to_toml_dict(self) -> dict[str, Any]:
        """The spec as plain data in its TOML form (parses back to an equal spec)."""
        data = self.model_dump(mode="json")
        for name, param in self.search.params().items():
            data["search"][name] = _param_to_toml(param)
        return data


def _param_to_toml(param: ChoiceParam | RangeParam) -> Any:
    if isinstance(param, ChoiceParam):
        return list(param.choices)
    table: dict[str, Any] = {"low": param.low, "high": param.high, "log": param.log}
    if param.integer:
        table["low"], table["high"] = int(param.low), int(param.high)
    if param.step is not None:
        table["step"] = int(param.step) if param.integer else param.step
    return table


# --- loading -----------------------------------------------------------------------------


def _format_validation_error(error: ValidationError, origin: str) -> str:
    lines = []
    for item in error.errors():
        loc = ".".join(str(part) for part in item["loc"] if not str(part).startswith("function-"))
        # Discriminated-union locations add the tag ("choice"/"range") or validator names.
        loc = re.sub(r"\.(choice|range)(?=\.|$)", "", loc)
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field" + _allowed_fields_hint(item["loc"])
            lines.append(f"{origin}: {loc}: {message}")
            continue
        if message.startswith(("search.", loc + ":")) or message.startswith(loc):
            lines.append(f"{origin}: {message}")
            continue
        received = item.get("input")
        shown = "" if isinstance(received, (dict, BaseModel)) else f"got {received!r}; "
        lines.append(f"{origin}: {loc}: {shown}{message}")
    return "\n".join(lines)


_SECTIONS: dict[str, type[_Strict]] = {
    "data": DataSpec,
    "backbone": BackboneSpec,
    "schedule": ScheduleSpec,
    "search": SearchSpec,
    "objective": ObjectiveSpec,
    "performance": PerformanceSpec,
    "augmentation": AugmentationSpec,
    "cache": CacheSpec,
}


def _allowed_fields_hint(loc: tuple[Any, ...]) -> str:
    parent = str(loc[-2]) if len(loc) >= 2 else ""
    model = _SECTIONS.get(parent, StudySpec)
    allowed = [name for name in model.model_fields if name != "base_dir"]
    return f"; allowed: {', '.join(allowed)}"


def parse_spec(raw: Mapping[str, Any], *, base_dir: str | Path = ".", origin: str = "study spec") -> StudySpec:
    """Validate a spec given as a mapping (the parsed TOML).

    Args:
        raw: The spec's fields.
        base_dir: Folder that relative paths in the spec are resolved against.
        origin: How to name the spec in error messages (usually its file name).

    Raises:
        ConfigError: naming the field, the value received and what is allowed.
    """
    data = dict(raw)
    if "base_dir" in data:
        raise ConfigError(f"{origin}: base_dir: unknown field")
    data["base_dir"] = str(base_dir)
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, origin)) from None
    except ConfigError as error:
        raise ConfigError(f"{origin}: {error}") from None
    _check_data_source(spec, origin)
    _check_weights(spec, origin)
    _check_input_pipeline(spec, origin)
    return spec


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study spec TOML file.

    Raises:
        ConfigError: the file is missing, is not TOML, or a field is invalid.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study spec {str(path)!r}: no such file")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    return parse_spec(raw, base_dir=path.resolve().parent, origin=str(path))


def _check_data_source(spec: StudySpec, origin: str) -> None:
    folder = spec.image_folder
    if folder is None:
        return
    from autofinetune.data.sources import scan_image_folder

    try:
        scan_image_folder(folder)
    except ConfigError as error:
        raise ConfigError(f"{origin}: data.source: {error}") from None


def _check_weights(spec: StudySpec, origin: str) -> None:
    path = spec.weights_path
    if path is not None and not path.is_file():
        raise ConfigError(
            f"{origin}: backbone.weights: got {spec.backbone.weights!r}, but {str(path)!r} is not a file; "
            'allowed: "imagenet", "none", or the path of a weights file (.weights.h5 or .h5)'
        )


def _check_input_pipeline(spec: StudySpec, origin: str) -> None:
    # Looked up without importing: TensorFlow's import costs seconds, and GPU machines may
    # run JAX without it.
    import importlib.util

    if spec.performance.input_pipeline == "tf_data" and importlib.util.find_spec("tensorflow") is None:
        raise ConfigError(
            f"{origin}: performance.input_pipeline: got 'tf_data', but TensorFlow is not installed; "
            "allowed here: 'numpy', 'auto' or 'py_dataset'"
        )
