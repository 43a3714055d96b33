"""Warm start: what earlier studies learned, in the current study's space and terms.

A study warm-started from others (``search.warm_start``) gets two things from them:

* their best configurations, queued after the baseline (:func:`best_configurations`; the
  study database side is :mod:`autofinetune.store.warm_start`);
* a sampler that sees their finished trials as prior observations while the study has few of its
  own (:class:`WarmStartSampler`).

Values of different tasks are not comparable (80 % accuracy is good on one data set, poor on
another), so every trial's value is replaced by its quantile within its own study, the current
study's as well: the ranking within a study is what TPE splits on, and a source's best and the
current study's best then stand side by side. Another study's configuration comes into this
space with :func:`into_space`.
"""

from __future__ import annotations

import copy
from bisect import bisect_left, bisect_right
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Container, Mapping, Sequence

from optuna.samplers import BaseSampler
from optuna.study._constrained_optimization import _CONSTRAINTS_KEY
from optuna.trial import FrozenTrial, TrialState

from autofinetune.search.space import optuna_distributions, snap_into, trial_space
from autofinetune.spec import PARAMETERS, StudySpec

logger = logging.getLogger(__name__)

#: Finished trials of its own after which a study no longer sees the sources' trials; before,
#: fewer and fewer of them (evenly spread over their ranking) as its own accumulate.
FADE_AFTER = 20
#: Samplers whose next sample does not depend on the finished trials: they see the study as it is.
_BLIND_SAMPLERS = ("RandomSampler", "QMCSampler")


@dataclass(frozen=True)
class SourceStudy:
    """The finished trials of one warm-start study.

    Attributes:
        label: Its name (the trials it queues say ``label#number``).
        maximize: Whether a higher value is better there.
        trials: Its COMPLETE trials with a finite value that kept its constraints.
    """

    label: str
    maximize: bool
    trials: tuple[FrozenTrial, ...]

    def ranked(self) -> list[FrozenTrial]:
        """Its trials, best first."""
        return sorted(self.trials, key=lambda t: float(t.value or 0.0), reverse=self.maximize)


#: Reads the warm-start studies of the study a sampler samples for (it may use that study's
#: storage for studies in the same database). Must pickle: Ray pickles its searcher.
SourceReader = Callable[[Any], Sequence[SourceStudy]]


def into_space(spec: StudySpec, params: Mapping[str, Any]) -> dict[str, Any]:
    """Another study's configuration as a trial of ``spec``'s space.

    Each value moves to the nearest value of this space (a name the space lacks: its first
    choice); a parameter this space fixes takes its value; a conditional parameter the trial
    does not have here is left out, one it has but ``params`` lacks takes the seed recipe's value
    (as the baseline does).
    """
    result: dict[str, Any] = {}
    for name in spec.search.params():
        parameter = PARAMETERS[name]
        if not parameter.is_active(result):
            continue
        value = params[name] if name in params else parameter.seed
        result[name] = parameter.cast(snap_into(trial_space(spec, name, result), value))
    return result


def best_configurations(
    spec: StudySpec, sources: Sequence[SourceStudy], *, k: int, known: Sequence[Mapping[str, Any]] = ()
) -> list[tuple[str, dict[str, Any]]]:
    """Up to ``k`` configurations to queue: each source's best first, then each one's second
    best, ..., each moved into ``spec``'s space, none equal to another or to one ``known``.

    Returns:
        ``(label#number, params)`` pairs, in the order they should run.
    """
    seen = [dict(params) for params in known]
    chosen: list[tuple[str, dict[str, Any]]] = []
    queues = [source.ranked() for source in sources]
    for rank in range(max((len(queue) for queue in queues), default=0)):
        for source, queue in zip(sources, queues):
            if len(chosen) >= k:
                return chosen
            if rank < len(queue):
                params = into_space(spec, queue[rank].params)
                if params not in seen:
                    seen.append(params)
                    chosen.append((f"{source.label}#{queue[rank].number}", params))
    return chosen


def quantiles(values: Sequence[float], *, maximize: bool) -> list[float]:
    """Each value's share of the others it beats (0: the worst, 1: the best; ties share a rank)."""
    n = len(values)
    if n == 1:
        return [0.5]
    signed = [v if maximize else -v for v in values]
    order = sorted(signed)
    # Below it, plus half of those equal to it besides itself: O(n log n), called on every sample.
    return [(bisect_left(order, v) + (bisect_right(order, v) - bisect_left(order, v) - 1) / 2) / (n - 1) for v in signed]


def _with_value(trial: FrozenTrial, value: float) -> FrozenTrial:
    # A shallow copy: the cached trial the study holds is never changed.
    view = copy.copy(trial)
    view._values = [value]
    return view


def prior_trials(spec: StudySpec, sources: Sequence[SourceStudy], *, maximize: bool) -> list[FrozenTrial]:
    """The sources' trials as trials of the current study: params in its space, each value its
    quantile within its source (in the current study's direction), numbered below 0 so they come
    before (are older than) every trial of the study, and collide with none. Under
    ``objective.constraints`` each counts as feasible (only the sources' feasible trials come),
    recorded as the study's trials record theirs: GP needs the same constraints on every trial."""
    converted: list[FrozenTrial] = []
    kept = {_CONSTRAINTS_KEY: (0.0,) * len(spec.objective.constraints)} if spec.objective.constraints else {}
    for source in sources:
        ranked = source.ranked()[::-1]  # worst first: the number order is the quantile order
        shares = quantiles([float(t.value or 0.0) for t in ranked], maximize=source.maximize)
        for trial, share in zip(ranked, shares):
            params = into_space(spec, trial.params)
            converted.append(FrozenTrial(
                number=0, trial_id=0, state=TrialState.COMPLETE, value=share if maximize else 1.0 - share,
                values=None, datetime_start=trial.datetime_start, datetime_complete=trial.datetime_complete,
                params=params, distributions=optuna_distributions(spec, params), user_attrs={}, system_attrs=dict(kept),
                intermediate_values={},
            ))
    for index, trial in enumerate(converted):
        trial.number = trial._trial_id = index - len(converted)  # -n .. -1
    return converted


def thinned(trials: Sequence[FrozenTrial], keep: int) -> list[FrozenTrial]:
    """``keep`` of ``trials``, evenly spread over their order (all of them where ``keep`` is more)."""
    if keep >= len(trials):
        return list(trials)
    if keep <= 0:
        return []
    step = len(trials) / keep
    return [trials[int(i * step)] for i in range(keep)]


class _StudyView:
    """The study as a sampler sees it: its trials after ``prior`` (values as quantiles).

    Everything else (storage, directions, the study's id) is the study's own, so what a
    sampler writes (a trial's system attributes) goes to the study's trials.
    """

    def __init__(self, study: Any, prior: Sequence[FrozenTrial], *, maximize: bool) -> None:
        self._study = study
        self._prior = prior
        self._maximize = maximize

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(
        self, deepcopy: bool = True, states: Container[TrialState] | None = None, use_cache: bool = False
    ) -> list[FrozenTrial]:
        own = self._study._get_trials(deepcopy=False, states=states, use_cache=use_cache)
        scored = [t for t in own if t.state == TrialState.COMPLETE and t.values is not None and len(t.values) == 1
                  and math.isfinite(t.values[0])]
        shares = dict(zip((t.number for t in scored), quantiles([t.values[0] for t in scored], maximize=self._maximize)))
        # The study's COMPLETE trials take their quantile, in the study's direction, as the prior's do.
        mine = [
            _with_value(t, shares[t.number] if self._maximize else 1.0 - shares[t.number]) if t.number in shares else t
            for t in own
        ]
        prior = [t for t in self._prior if states is None or t.state in states]
        trials = prior + mine
        return copy.deepcopy(trials) if deepcopy else trials

    def get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return self._get_trials(deepcopy=deepcopy, states=states)


class WarmStartSampler(BaseSampler):
    """A sampler that starts from what earlier studies learned.

    The wrapped sampler samples as always, but sees a study whose trials are, before the
    study's own, the warm-start studies' finished trials moved into this space
    (:func:`prior_trials`), with every value its quantile within its own study. TPE then
    leaves its random start-up at once and samples near the sources' best; as the study
    finishes trials of its own, fewer source trials are shown (none after ``fade_after``).
    Random and QMC sampling ignore finished trials: they see the study as it is.

    Nothing is written to a source study, and no source trial is recorded in this one.

    Args:
        sampler: The sampler to wrap (the spec's, :func:`~autofinetune.search.algorithms.make_sampler`).
        spec: The study's spec (its space and direction).
        reader: Reads the source studies (:mod:`autofinetune.store.warm_start`), once per process,
            on the first sample; where it fails the sampler samples as if cold, with one warning.
        fade_after: Finished trials of the study's own after which no source trial is shown.
    """

    def __init__(self, sampler: BaseSampler, spec: StudySpec, reader: SourceReader, *, fade_after: int = FADE_AFTER) -> None:
        self._sampler = sampler
        self._spec = spec
        self._reader = reader
        self._fade_after = fade_after
        self._prior: list[FrozenTrial] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Read again where it is unpickled (a Ray process): the pickle holds no trial data.
        return {**self.__dict__, "_prior": None}

    def __str__(self) -> str:
        return f"WarmStartSampler({self._sampler})"

    def _load(self, study: Any) -> list[FrozenTrial]:
        if self._prior is None:
            try:
                sources = self._reader(study)
            except Exception as error:  # a hint lost is no reason to stop a search
                logger.warning("warm start: the earlier studies could not be read (%s); sampling without them", error)
                sources = []
            self._prior = prior_trials(self._spec, sources, maximize=self._spec.objective.maximize)
        return self._prior

    def _view(self, study: Any) -> Any:
        if type(self._sampler).__name__ in _BLIND_SAMPLERS:
            return study
        prior = self._load(study)
        finished = len(study._get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED), use_cache=True))
        keep = math.ceil(len(prior) * max(0.0, 1.0 - finished / self._fade_after))
        if keep == 0:  # faded out (or nothing to show): the study's own values, as a cold sampler sees them
            return study
        return _StudyView(study, thinned(prior, keep), maximize=self._spec.objective.maximize)

    def infer_relative_search_space(self, study: Any, trial: FrozenTrial) -> dict[str, Any]:
        return self._sampler.infer_relative_search_space(self._view(study), trial)

    def sample_relative(self, study: Any, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        return self._sampler.sample_relative(self._view(study), trial, search_space)

    def sample_independent(self, study: Any, trial: FrozenTrial, param_name: str, param_distribution: Any) -> Any:
        return self._sampler.sample_independent(self._view(study), trial, param_name, param_distribution)

    def before_trial(self, study: Any, trial: FrozenTrial) -> None:
        self._sampler.before_trial(study, trial)

    def after_trial(self, study: Any, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        self._sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._sampler.reseed_rng()
