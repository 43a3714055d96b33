"""Create, resume and describe a study in the study database (engine-neutral, no Keras).

A study carries its spec (passwords redacted) and its trial budget as study attributes, so a
worker joining from another machine needs only the study name and the database URL.
"""

from __future__ import annotations

import warnings
from typing import Any

from pydantic import ValidationError

from autofinetune.spec import SKIP_BACKBONE_FUNCTIONS, ObjectiveSpec, StudySpec, parse_spec
from autofinetune.spec.constraints import feasible
from autofinetune.errors import ConfigError, FatalError
from autofinetune.search.space import baseline_params, optuna_distributions
from autofinetune.store.attributes import (
    BASELINE_ATTR,
    RETRY_OF_ATTR,
    SELECTION_SCORE_ATTR,
    STUDY_CLASSES_ATTR,
    STUDY_FINGERPRINT_ATTR,
    STUDY_N_TRIALS_ATTR,
    STUDY_SPEC_ATTR,
    STUDY_UID_ATTR,
)
from autofinetune.store.database import load_study, redact_url
from autofinetune.store.retries import retry_history
from autofinetune.store.warm_start import enqueue_warm_start


def spec_to_attr(spec: StudySpec) -> dict[str, Any]:
    """The spec as stored on the study: JSON data, storage URL redacted, and its base folder."""
    data = spec.to_toml_dict()
    if data.get("storage"):
        data["storage"] = redact_url(data["storage"])
    return {"spec": data, "base_dir": spec.base_dir}


def spec_from_study(study, *, check_files: bool = False) -> StudySpec:
    """The spec a study was launched with.

    Args:
        study: The study.
        check_files: Also require the spec's image folder and weights file to exist here, as
            ``launch`` does (default: ``False``). Where trials run, ask for it; reading a study
            (``export``, reports) must work where the images are not: the class names are
            stored on the study.

    Raises:
        ConfigError: the study was not created by autofinetune, its stored spec is invalid, or
            (with ``check_files``) a file it names is missing here.
    """
    stored = study.user_attrs.get(STUDY_SPEC_ATTR)
    if stored is None:
        raise ConfigError(
            f"study {study.study_name!r} has no autofinetune spec; it was not created by `autofinetune launch`"
        )
    origin = f"study {study.study_name!r}"
    if check_files:
        return parse_spec(stored["spec"], base_dir=stored["base_dir"], origin=origin)
    # Validated with its files when the study was launched; here its fields only, and a user's
    # backbone function is not imported: its module need not be where the study is read.
    try:
        return StudySpec.model_validate(
            {**stored["spec"], "base_dir": stored["base_dir"]}, context={SKIP_BACKBONE_FUNCTIONS: True}
        )
    except (ValidationError, ValueError) as error:
        raise ConfigError(f"{origin}: the stored spec is not valid: {error}") from None


def _identity(spec: StudySpec) -> dict[str, Any]:
    """What must not change when a study is resumed: anything that makes trials incomparable."""
    dump = spec.to_toml_dict()
    return {
        "data": dump["data"],
        "backbone": dump["backbone"],
        "schedule": dump["schedule"],
        "objective": dump["objective"],
        "search space": {name: repr(dist) for name, dist in optuna_distributions(spec).items()},
        "seed": spec.seed,
    }


def _differences(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found: list[str] = []
        for key in sorted(set(old) | set(new)):
            found += _differences(old.get(key), new.get(key), f"{path}.{key}" if path else key)
        return found
    return [] if old == new else [f"{path}: study has {old!r}, spec has {new!r}"]


def create_or_resume_study(spec: StudySpec, storage, *, n_trials: int | None = None):
    """Create the spec's study, or resume it when it exists with the same space.

    Args:
        spec: The validated spec.
        storage: An opened Optuna storage.
        n_trials: The study's total trial budget (default: the spec's ``search.n_trials``).

    Returns:
        ``(study, created)``.

    Raises:
        ConfigError: the study exists with a different spec (data, backbone, schedule,
            objective, seed or search space); nothing is written then.
    """
    import optuna

    budget = n_trials if n_trials is not None else spec.search.n_trials
    existing = spec.name in optuna.get_all_study_names(storage)
    if existing:
        study = load_study(spec.name, storage)
        _check_resumable(study, spec)
        created = False
    else:
        try:
            study = optuna.create_study(storage=storage, study_name=spec.name, directions=spec.objective.directions)
            created = True
        except optuna.exceptions.DuplicatedStudyError:  # another launch won the race
            return create_or_resume_study(spec, storage, n_trials=n_trials)
    study.set_user_attr(STUDY_SPEC_ATTR, spec_to_attr(spec))
    study.set_user_attr(STUDY_N_TRIALS_ATTR, budget)
    study_uid(study)
    # Plots (Optuna's, the dashboard's) then name the objectives "val_accuracy", not "Objective 0".
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(spec.objective.names)
    if spec.search.baseline_trial and not any(t.user_attrs.get(BASELINE_ATTR) for t in study.get_trials(deepcopy=False)):
        study.enqueue_trial(baseline_params(spec), user_attrs={BASELINE_ATTR: True})
    if created:  # then the best configurations of the warm-start studies, if any
        enqueue_warm_start(study, spec, storage, room=budget - len(study.get_trials(deepcopy=False)))
    return study, created


def _check_resumable(study, spec: StudySpec) -> None:
    """Raise a ConfigError naming the fields when the study ran with another spec."""
    directions = [direction.name.lower() for direction in study.directions]
    if directions != spec.objective.directions:
        # A study's objectives are fixed when it is created: Optuna cannot add or drop one.
        raise ConfigError(
            f"study {spec.name!r} already exists with {len(directions)} objective(s) {directions}, and the spec's "
            f"objective.metric and objective.pareto_with give {len(spec.objective.directions)} "
            f"{spec.objective.names} {spec.objective.directions}; give the new spec another name"
        )
    diffs = _differences(_identity(spec_from_study(study)), _identity(spec))
    if diffs:
        raise ConfigError(
            f"study {spec.name!r} already exists with a different spec, so its trials could not be "
            "compared; give the new spec another name, or restore these fields:\n  " + "\n  ".join(diffs)
        )


def finished_study(spec: StudySpec, storage, *, n_trials: int | None = None):
    """The spec's study when it exists with nothing left to run, else ``None``: its budget
    (``n_trials``, else the spec's) is used, and no trial is queued or running.

    Read only: ``launch`` asks before it starts any worker, so a resume with nothing to do
    answers at once.

    Raises:
        ConfigError: the study exists with another spec (as :func:`create_or_resume_study`).
    """
    import optuna
    from optuna.trial import TrialState

    if spec.name not in optuna.get_all_study_names(storage):
        return None
    study = load_study(spec.name, storage)
    _check_resumable(study, spec)
    counted, waiting = budget_used(study)
    budget = n_trials if n_trials is not None else spec.search.n_trials
    if waiting or counted < budget or study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        return None
    return study


def is_feasible(trial) -> bool:
    """Whether the trial kept every ``objective.constraints`` (a trial of a study without
    constraints always does), as Optuna's ``Study.best_trial`` counts it."""
    return feasible(trial.constraints.values())


def check_directions(study, objective: ObjectiveSpec) -> None:
    """Raise a ConfigError when a study (a user's own) is not created for the spec's objectives.

    Args:
        study: The Optuna study.
        objective: The spec's ``[objective]``.
    """
    have = [direction.name.lower() for direction in study.directions]
    if have == objective.directions:
        return
    field = "objective.pareto_with" if len(have) != len(objective.directions) else "objective.metric"
    made = f"directions={objective.directions!r}" if objective.is_multi else f"direction={objective.directions[0]!r}"
    raise ConfigError(
        f"{field}: the objectives {objective.names} are to {objective.directions}, but the study's directions are "
        f"{have}; create it with optuna.create_study({made})"
    )


def is_multi_objective(study) -> bool:
    """Whether the study has several objectives (``objective.pareto_with``)."""
    return len(study.directions) > 1


def main_value(trial) -> float | None:
    """A trial's value on the main metric: its only value, or its first of several (where
    Optuna's ``FrozenTrial.value`` raises)."""
    return trial.values[0] if trial.values else None


def _main_maximized(study) -> bool:
    return study.directions[0].name == "MAXIMIZE"


def pareto_front(study) -> list:
    """The study's best trials: Optuna's ``best_trials`` (COMPLETE trials no other one beats on
    every objective; only feasible ones when constraints are set), best on the main metric
    first. With one objective: the best feasible trial alone, or nothing."""
    if not is_multi_objective(study):
        best = best_feasible_trial(study)
        return [] if best is None else [best]
    front = [t for t in study.best_trials if is_feasible(t)]
    maximize = _main_maximized(study)
    return sorted(front, key=lambda t: (-(t.values[0]) if maximize else t.values[0], t.number))


def best_feasible_trial(study):
    """The study's best COMPLETE trial that kept its constraints; ``None`` when there is none
    (where Optuna's ``best_trial`` raises).

    The best by its direction, or, where its trials were scored on ``data.selection_split``,
    the final choice among the best few (:func:`final_choice`). With several objectives, the
    Pareto front's (:func:`pareto_front`) best on the main metric. It is the trial ``export``,
    ``status``, the reports and the trackers name.
    """
    from optuna.trial import TrialState

    if is_multi_objective(study):
        front = pareto_front(study)
        return front[0] if front else None
    candidates = [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.value is not None and is_feasible(t)
    ]
    if not candidates:
        return None
    maximize = _main_maximized(study)
    ranked = sorted(candidates, key=lambda t: (-t.value if maximize else t.value, t.number))
    return final_choice(ranked, maximize=maximize)


def final_choice(ranked: list, *, maximize: bool):
    """The final choice among trials ranked best first by validation.

    Each trial scored on the selection split records how many of the best compete
    (``among``); of those best, the ones with a score compete on it and the best score wins
    (a tie goes to the better by validation). Without any score: the first, the best by
    validation.

    Args:
        ranked: COMPLETE feasible trials, best by value first (ties: lower number first).
        maximize: Whether a higher value (and selection score) is better.
    """
    scores = {t.number: t.user_attrs[SELECTION_SCORE_ATTR] for t in ranked if SELECTION_SCORE_ATTR in t.user_attrs}
    if not scores:
        return ranked[0]
    among = max(int(score.get("among", 1)) for score in scores.values())
    contenders = [t for t in ranked[:among] if t.number in scores]
    if not contenders:
        return ranked[0]
    pick = max if maximize else min
    return pick(contenders, key=lambda t: float(scores[t.number]["value"]))


def retried_trial_numbers(trials) -> set[int]:
    """Numbers of failed trials that were retried as a new trial (by the stale-trial callback)."""
    retried: set[int] = set()
    for trial in trials:
        retried.update(retry_history(trial))
    return retried


def budget_used(study) -> tuple[int, int]:
    """``(counted, waiting)``: trials that count towards ``n_trials``, and those queued.

    Every trial counts (finished, running, queued) except a failed trial that was retried:
    its retry counts in its place.
    """
    from optuna.trial import TrialState

    from autofinetune.store.optuna_internals import count_trials

    counts = count_trials(study, marked_by=RETRY_OF_ATTR)
    if counts is not None:
        # Each retry (it names the trial it retries) replaces one failed trial in the count.
        every, waiting, retries = counts
        return every - retries, waiting
    trials = study.get_trials(deepcopy=False)
    retried = retried_trial_numbers(trials)
    counted = sum(1 for t in trials if not (t.state == TrialState.FAIL and t.number in retried))
    waiting = sum(1 for t in trials if t.state == TrialState.WAITING)
    return counted, waiting


def study_budget(study) -> int:
    """The study's total trial budget."""
    return int(study.user_attrs.get(STUDY_N_TRIALS_ATTR, 0))


def load_study_data(study, spec: StudySpec):
    """The spec's images, checked against (or recorded as) the data the study started with.

    The first process to load them stores their fingerprint and class names on the study:
    ``export`` reads the class names there, so a model can be exported where the images are
    not. Later processes (other workers, Ray nodes, engines) must see the same images.

    Returns:
        The :class:`~autofinetune.data.sources.ImageData`.

    Raises:
        FatalError: this process sees other images than the study started with.
    """
    import socket

    from autofinetune.data.sources import load_data

    data = load_data(spec)
    attrs = study.user_attrs
    known = attrs.get(STUDY_FINGERPRINT_ATTR)
    if known is None:
        study.set_user_attr(STUDY_FINGERPRINT_ATTR, data.fingerprint)
    elif known != data.fingerprint:
        raise FatalError(
            f"the data this process on {socket.gethostname()} sees ({data.source}) differs from the data the "
            f"study started with (fingerprint {data.fingerprint[:12]} != {known[:12]}); every worker, Ray "
            "node and engine must see the same images"
        )
    if STUDY_CLASSES_ATTR not in attrs:
        study.set_user_attr(STUDY_CLASSES_ATTR, list(data.class_names))
    return data


def study_uid(study) -> str:
    """The study's stable id: made (a random UUID) and stored the first time it is asked for,
    when ``launch`` creates the study, or by a user's own study on its first tracked trial."""
    import uuid

    known = study.user_attrs.get(STUDY_UID_ATTR)
    if isinstance(known, str) and known:
        return known
    made = uuid.uuid4().hex
    study.set_user_attr(STUDY_UID_ATTR, made)
    return made
