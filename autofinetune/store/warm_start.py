"""Warm start in the study database: the earlier studies a study starts from, read and checked.

``search.warm_start`` (or ``launch --warm-start``) names earlier studies, ``NAME`` in the same
database or ``NAME@URL``. ``launch`` checks them before it writes anything
(:func:`check_warm_start`); a new study queues their best configurations after its baseline
(:func:`enqueue_warm_start`), and every engine's sampler reads their trials
(:class:`SourceTrials`, for :class:`~autofinetune.search.warm_start.WarmStartSampler`).
Source studies are only read, never written.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from autofinetune.errors import ConfigError
from autofinetune.search.warm_start import SourceStudy, best_configurations
from autofinetune.spec import ObjectiveSpec, StudySpec
from autofinetune.spec.constraints import feasible
from autofinetune.spec.references import ALLOWED_REFERENCE, StudyReference, parse_study_reference
from autofinetune.store.attributes import STUDY_SPEC_ATTR, WARM_START_ATTR
from autofinetune.store.database import load_study, open_storage, redact_url, resolve_storage_url, sqlite_path
from autofinetune.store.optuna_internals import storage_of

FLAG = "--warm-start"
FIELD = "search.warm_start"


def with_warm_start(spec: StudySpec, references: Sequence[str] | None) -> StudySpec:
    """``spec`` with ``search.warm_start`` replaced by ``references`` (``--warm-start``, whose
    items may each hold several, comma-separated); ``None`` keeps the spec's.

    Raises:
        ConfigError: a reference is malformed, naming the flag.
    """
    from pydantic import ValidationError

    if references is None:
        return spec
    items = [item.strip() for text in references for item in text.split(",") if item.strip()]
    data = spec.to_toml_dict()
    try:
        return StudySpec.model_validate({**data, "search": {**data["search"], "warm_start": items}, "base_dir": spec.base_dir})
    except ValidationError as error:
        message = error.errors()[0]["msg"].removeprefix("Value error, ").removeprefix(f"{FIELD}: ")
        raise ConfigError(f"{FLAG}: {message}") from None


def _open(url: str) -> Any:
    """An existing database, read through the project's storage (retries, SQLite's WAL)."""
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        # Opening it would create an empty file.
        raise ConfigError(f"the database {redact_url(url)!r} does not exist")
    return open_storage(url, create=False)


def _source(reference: StudyReference, storage_here: Any, spec: StudySpec) -> tuple[Any, str | None]:
    """``(the study, why it cannot warm-start spec's study or None)``."""
    storage = storage_here if reference.url is None else _open(resolve_storage_url(reference.url))
    study = load_study(reference.name, storage)
    stored = study.user_attrs.get(STUDY_SPEC_ATTR)
    if stored is None:
        return study, "it was not created by `autofinetune launch`"
    if len(study.directions) != 1:
        return study, "it is a multi-objective study"
    objective = ObjectiveSpec.model_validate(stored["spec"].get("objective", {}))
    wanted = spec.objective
    if (objective.metric, study.direction.name.lower()) != (wanted.metric, wanted.resolved_direction):
        return study, (
            f"it is scored by {objective.metric} ({study.direction.name.lower()}), this study by {wanted.metric} "
            f"({wanted.resolved_direction}); a warm-start study must have the same objective"
        )
    return study, None


def check_warm_start(spec: StudySpec, url: str, *, flag: bool = False) -> None:
    """Refuse a warm-start study that does not exist, cannot be reached, has another objective,
    or is the study itself; reads only, and names ``--warm-start`` (``flag``) or the field.

    Raises:
        ConfigError: naming the field or flag, the reference and what is allowed.
    """
    where = FLAG if flag else FIELD
    if spec.search.warm_start and spec.objective.is_multi:
        # The sampler's prior ranks each source's trials on one value; a Pareto front has none.
        raise ConfigError(
            f"{where}: got {list(spec.search.warm_start)!r} with objective.pareto_with; warm start needs a study "
            "of one objective, so leave out one of them"
        )
    here: Any = None
    for text in spec.search.warm_start:
        reference = parse_study_reference(text)
        shown = f"{where}: {redact_url(str(reference))!r}"
        if reference.name == spec.name and (reference.url is None or resolve_storage_url(reference.url) == url):
            raise ConfigError(f"{shown} is the study itself; name earlier studies, as {ALLOWED_REFERENCE}")
        try:
            if here is None and reference.url is None:
                here = _open(url)
            _, problem = _source(reference, here, spec)
        except ConfigError as error:
            raise ConfigError(f"{shown}: {error}; a reference is {ALLOWED_REFERENCE}") from None
        if problem is not None:
            raise ConfigError(f"{shown}: {problem}")


def read_sources(spec: StudySpec, storage_here: Any) -> list[SourceStudy]:
    """The finished, feasible trials of each ``search.warm_start`` study, in the spec's order.

    Args:
        storage_here: The storage of the warm-started study (for studies named without a URL).
    """
    from optuna.trial import TrialState

    sources = []
    for text in spec.search.warm_start:
        reference = parse_study_reference(text)
        study, problem = _source(reference, storage_here, spec)
        if problem is not None:
            raise ConfigError(f"{FIELD}: {redact_url(str(reference))!r}: {problem}")
        trials = tuple(
            t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value) and feasible(t.constraints.values())
        )
        sources.append(SourceStudy(label=redact_url(str(reference)), maximize=spec.objective.maximize, trials=trials))
    return sources


class SourceTrials:
    """Reads the spec's warm-start studies for a sampler (picklable: it holds their names only).

    Args:
        spec: The warm-started study's spec.
    """

    def __init__(self, spec: StudySpec) -> None:
        self.spec = spec

    def __call__(self, study: Any) -> list[SourceStudy]:
        return read_sources(self.spec, storage_of(study))


def warm_start_sources(spec: StudySpec) -> SourceTrials | None:
    """The reader of the spec's warm-start studies for :func:`~autofinetune.search.algorithms.make_sampler`;
    ``None`` where it names none."""
    return SourceTrials(spec) if spec.search.warm_start else None


def enqueue_warm_start(study: Any, spec: StudySpec, storage: Any, *, room: int) -> int:
    """Queue the warm-start studies' best configurations in a new study, after its baseline.

    Up to ``search.warm_start_trials`` (and ``room``, what the budget leaves) in all: each
    source's best, then each one's second best, ..., moved into this space
    (:func:`~autofinetune.search.warm_start.into_space`), none equal to a queued trial. Each
    carries the user attribute ``warm_start_from`` (``"study#trial number"``).

    Returns:
        How many were queued.
    """
    from optuna.trial import TrialState

    if not spec.search.warm_start or room <= 0:
        return 0
    queued = [dict(t.params) | dict(t.system_attrs.get("fixed_params", {}))
              for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))]
    chosen = best_configurations(
        spec, read_sources(spec, storage), k=min(spec.search.warm_start_trials, room), known=queued
    )
    for origin, params in chosen:
        study.enqueue_trial(params, user_attrs={WARM_START_ATTR: origin})
    return len(chosen)
