"""One study spec: its sections together, the checks across sections, its resolved paths."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationInfo, field_validator, model_validator

from autofinetune.spec.algorithms import MULTI_OBJECTIVE_SAMPLERS
from autofinetune.spec.backbones import BackboneInfo, get_backbone_info
from autofinetune.spec.user_backbones import is_user_backbone_name
from autofinetune.spec.base import StrictModel
from autofinetune.spec.params import PARAMETERS, ChoiceParam, TrialParams, format_number, param_to_toml
from autofinetune.spec.tracking import TrackingSpec
from autofinetune.spec.sections import (
    BackboneSpec,
    CacheSpec,
    DataSpec,
    ObjectiveSpec,
    PerformanceSpec,
    ScheduleSpec,
    SearchSpec,
)

#: A validation context key: ``{SKIP_BACKBONE_FUNCTIONS: True}`` leaves a user's
#: ``module:function`` backbone unimported, for reading a study where its module is not.
SKIP_BACKBONE_FUNCTIONS = "skip_backbone_functions"

#: The study database of a spec that names none (and of no ``--storage`` flag).
DEFAULT_STORAGE = "sqlite:///autofinetune.db"


class StudySpec(StrictModel):
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
    tracking: TrackingSpec = TrackingSpec()
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

    @model_validator(mode="before")
    @classmethod
    def _followed_fields_searched_by_default(cls, data: Any) -> Any:
        """A parameter that follows a spec field (``backbone.name``, ``data.batch_size``) and
        that ``[search]`` leaves out is searched over that field's value alone."""
        if not isinstance(data, dict):
            return data
        search = data.get("search", {})
        if not isinstance(search, dict):
            return data  # a SearchSpec given as an object keeps its own space
        filled = dict(search)
        for name, parameter in PARAMETERS.items():
            if parameter.follows is None or name in filled:
                continue
            filled[name] = [cls._given_or_default(data, parameter.follows.split("."))]
        return {**data, "search": filled}

    @classmethod
    def _given_or_default(cls, data: dict[str, Any], path: list[str]) -> Any:
        """The value at ``path`` (``["data", "augmentation", "zoom"]``) of a spec's raw data, or
        the field's default where the data leaves it out."""
        node: Any = data
        for part in path:
            node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
            if node is None:
                break
        if node is not None:
            return node
        node = cls.model_fields[path[0]].default
        for part in path[1:]:
            node = getattr(node, part)
        return node

    @model_validator(mode="after")
    def _check_against_backbone(self, validation: ValidationInfo) -> "StudySpec":
        where = "backbone.name" if self.backbone_choices == [self.backbone.name] else "search.backbone"
        # A user's module:function is imported and called here, at the spec's image size.
        skip = bool((validation.context or {}).get(SKIP_BACKBONE_FUNCTIONS))
        names = [name for name in self.backbone_choices if not (skip and is_user_backbone_name(name))]
        infos = [self.backbone_info(name, field=where) for name in names]
        if not infos:
            return self
        # Each trial's depths go up to its own backbone's blocks (search.space.trial_space): the
        # space must fit the largest, and leave a depth for the smallest.
        depths = self.search.params()["unfreeze_depth"].integer_values() or [0]
        most = max(infos, key=lambda info: info.num_blocks)
        fewest = min(infos, key=lambda info: info.num_blocks)
        if isinstance(self.search.params()["unfreeze_depth"], ChoiceParam) and max(depths) > fewest.num_blocks:
            raise ValueError(
                f"search.unfreeze_depth: got up to {format_number(max(depths))}; backbone {fewest.name!r} has "
                f"{fewest.num_blocks} blocks, so every listed depth must be in [0, {fewest.num_blocks}]; a range "
                f"{{ low = ..., high = ... }} instead lets each trial go up to its own backbone's blocks"
            )
        if max(depths) > most.num_blocks:
            raise ValueError(
                f"search.unfreeze_depth: got up to {format_number(max(depths))}; backbone {most.name!r} has "
                f"{most.num_blocks} blocks, so the depth must be in [0, {most.num_blocks}]"
            )
        if min(depths) > fewest.num_blocks:
            raise ValueError(
                f"search.unfreeze_depth: got {format_number(min(depths))} at least; backbone {fewest.name!r} has "
                f"{fewest.num_blocks} blocks, so a trial on it needs a depth in [0, {fewest.num_blocks}]"
            )
        for info in infos:
            if self.data.image_size < info.min_image_size:
                raise ValueError(
                    f"data.image_size: got {self.data.image_size}; backbone {info.name!r} needs at least "
                    f"{info.min_image_size} pixels"
                )
            if self.backbone.weights == "imagenet" and not info.has_imagenet_weights:
                raise ValueError(
                    f'backbone.weights: "imagenet"; backbone {info.name!r} has no ImageNet weights, '
                    'use "none" or the path of a weights file'
                )
        if len(self.backbone_choices) > 1 and self.backbone.weights not in ("imagenet", "none"):
            raise ValueError(
                f"backbone.weights: got the file {self.backbone.weights!r} while search.backbone chooses among "
                f"{self.backbone_choices}; a weights file fits one architecture, so use \"imagenet\" or \"none\""
            )
        return self

    @model_validator(mode="after")
    def _constraints_need_a_sampler_that_keeps_them(self) -> "StudySpec":
        if self.objective.constraints and self.search.sampler == "cmaes":
            raise ValueError(
                "search.sampler: cmaes cannot sample under objective.constraints; use tpe, gp or nsgaii (which "
                "sample towards feasible trials), or random or qmc"
            )
        return self

    @model_validator(mode="after")
    def _final_choice_needs_one_objective(self) -> "StudySpec":
        if self.data.selection_split > 0 and self.objective.is_multi:
            raise ValueError(
                f"data.selection_split: got {self.data.selection_split} with objective.pareto_with; the final choice "
                "re-scores one objective, and a study of several keeps its whole Pareto front: set it to 0"
            )
        keep, among = self.search.keep_checkpoints, self.objective.final_choice_among
        if self.data.selection_split > 0 and 0 < keep < among:
            raise ValueError(
                f"search.keep_checkpoints: got {keep} with data.selection_split; the final choice may pick any of "
                f"the best objective.final_choice_among = {among} trials, so keep at least {among} models "
                "(or 0 to keep none)"
            )
        return self

    @model_validator(mode="after")
    def _several_objectives_need_no_pruner(self) -> "StudySpec":
        if not self.objective.is_multi:
            return self
        if self.search.pruner != "none":
            raise ValueError(
                f"search.pruner: got {self.search.pruner!r} with objective.pareto_with; a study of several "
                "objectives cannot prune (a pruner compares one value between trials): set search.pruner = \"none\""
            )
        if self.search.sampler not in MULTI_OBJECTIVE_SAMPLERS:
            raise ValueError(
                f"search.sampler: got {self.search.sampler!r} with objective.pareto_with; it searches one objective. "
                f"Allowed with several: {', '.join(MULTI_OBJECTIVE_SAMPLERS)}"
            )
        return self

    @property
    def backbone_choices(self) -> list[str]:
        """The backbones the search chooses among (``backbone.name`` alone unless
        ``search.backbone`` lists others)."""
        space = self.search.params()["backbone"]
        assert isinstance(space, ChoiceParam)  # a named parameter's space is always a choice
        return [str(name) for name in space.choices]

    def backbone_info(self, name: str | None = None, *, field: str = "backbone.name") -> BackboneInfo:
        """The catalogue entry of ``name`` (default ``backbone.name``), a ``module:function`` one
        looked for next to the spec file too and first called at ``data.image_size``.

        Raises:
            ConfigError: see :func:`~autofinetune.spec.backbones.get_backbone_info`.
        """
        return get_backbone_info(
            self.backbone.name if name is None else name, field=field, base_dir=self.base_dir,
            image_size=self.data.image_size,
        )

    def for_trial(self, params: TrialParams) -> "StudySpec":
        """This spec with the trial's value in every field a parameter follows (its backbone in
        ``backbone.name``, its batch size in ``data.batch_size``, its augmentation in
        ``data.augmentation``): what one trial builds, caches and records."""
        spec = self
        for name, parameter in PARAMETERS.items():
            if parameter.follows is not None:
                spec = _with_value(spec, parameter.follows.split("."), getattr(params, name))
        return spec

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

    @property
    def tensorboard_dir(self) -> Path | None:
        """The TensorBoard log folder of ``[tracking]``, or ``None`` when off."""
        value = self.tracking.tensorboard
        return None if value is None else self.resolve_path(value)

    def to_toml_dict(self) -> dict[str, Any]:
        """The spec as plain data in its TOML form (parses back to an equal spec)."""
        data = self.model_dump(mode="json")
        for name, param in self.search.params().items():
            data["search"][name] = param_to_toml(param)
        return data


def _with_value(model: StrictModel, path: list[str], value: Any) -> Any:
    """``model`` with ``value`` at the dotted ``path`` of its sections (itself where it holds it)."""
    current = getattr(model, path[0])
    if len(path) > 1:
        value = _with_value(current, path[1:], value)
    if current == value:
        return model
    return model.model_copy(update={path[0]: value})
