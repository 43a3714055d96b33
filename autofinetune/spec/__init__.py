"""The study spec: one TOML file that describes one study, validated before anything trains.

Read a spec with :func:`load_spec` (from a file) or :func:`parse_spec` (from a mapping); both
return an immutable :class:`StudySpec` or raise a :class:`~autofinetune.errors.ConfigError` that
names the field, the value received and what is allowed.

Modules: :mod:`~autofinetune.spec.params` (search-space parameters and their rules),
:mod:`~autofinetune.spec.sections` (one model per TOML table), :mod:`~autofinetune.spec.study_spec`
(the whole spec), :mod:`~autofinetune.spec.loading` (reading and file checks), and the catalogues
of what a spec may name: :mod:`~autofinetune.spec.algorithms` (samplers, pruners) and
:mod:`~autofinetune.spec.backbones` (with a user's ``module:function`` ones,
:mod:`~autofinetune.spec.user_backbones`).
"""

from autofinetune.spec.algorithms import PRUNERS, SAMPLERS
from autofinetune.spec.backbones import BackboneInfo, backbone_names, get_backbone_info
from autofinetune.spec.loading import load_spec, parse_spec
from autofinetune.spec.params import PARAMETERS, ChoiceParam, Parameter, ParamSpec, RangeParam, TrialParams
from autofinetune.spec.sections import (
    AugmentationSpec,
    BackboneSpec,
    CacheSpec,
    DataSpec,
    ObjectiveSpec,
    PerformanceSpec,
    ScheduleSpec,
    SearchSettings,
    SearchSpec,
    parse_size,
)
from autofinetune.spec.tracking import TrackingSpec
from autofinetune.spec.study_spec import DEFAULT_STORAGE, SKIP_BACKBONE_FUNCTIONS, StudySpec

__all__ = [
    "DEFAULT_STORAGE",
    "PARAMETERS",
    "PRUNERS",
    "SAMPLERS",
    "SKIP_BACKBONE_FUNCTIONS",
    "AugmentationSpec",
    "BackboneInfo",
    "BackboneSpec",
    "CacheSpec",
    "ChoiceParam",
    "DataSpec",
    "ObjectiveSpec",
    "ParamSpec",
    "Parameter",
    "PerformanceSpec",
    "RangeParam",
    "ScheduleSpec",
    "SearchSettings",
    "SearchSpec",
    "StudySpec",
    "TrackingSpec",
    "TrialParams",
    "backbone_names",
    "get_backbone_info",
    "load_spec",
    "parse_spec",
    "parse_size",
]
