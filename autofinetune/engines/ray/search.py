"""Ray's ``OptunaSearch`` on the study database, recording each trial's end as every engine does.

This module imports Ray at module level so that Tune can pickle its classes by reference;
import it only after :func:`~autofinetune.engines.ray.options.require_ray`.
"""

from __future__ import annotations

import copy
import logging
import pickle
import threading
import time
from typing import Any, Mapping

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from autofinetune.engines.ray.link import StudyLink, get_link
from autofinetune.engines.ray.options import OPTUNA_TRIAL_ID_KEY, OPTUNA_TRIAL_NUMBER_KEY, RAY_TRIAL_ATTR
from autofinetune.engines.trial_path import record_ended_trial
from autofinetune.search.space import suggest_params
from autofinetune.store.attributes import FAIL_REASON_ATTR
from autofinetune.store.trial_writer import stored_outcome
from autofinetune.store.optuna_internals import trial_id as storage_id_of

logger = logging.getLogger(__name__)

#: The attribute of NSGA-II's sampler that holds its lock (not picklable).
_SAMPLER_LOCK = "_thread_lock"


class StudySearch(OptunaSearch):
    """Ray's ``OptunaSearch`` on the study itself, recording each trial as the Optuna engine does.

    What it changes in ``OptunaSearch``, and why:

    * ``suggest`` stops at the study's trial budget (finished, running and queued trials count,
      so a resumed study runs only the missing trials) and at the deadline, tags the Optuna
      trial with its Ray trial, and passes the Optuna trial id to the actor in the config;
    * ``on_trial_result`` reports nothing: the actor writes each epoch at its global step
      (``training_iteration`` restarts when Ray retries a trial, and Optuna ignores a repeated
      step);
    * ``on_trial_complete`` tells the state the actor's schedule ended in -- COMPLETE with the
      best epoch's value, PRUNED, or FAIL with a reason -- instead of COMPLETE with the last
      reported value;
    * pickles (Tune's experiment state) hold no storage, hence no database password.

    Args:
        spec: The study's spec (its search space, sampler and objective).
        link: The open study (see :class:`StudyLink`).
        experiment: Name of the Ray experiment, recorded on each trial.
        seed: The sampler's seed.
    """

    def __init__(self, spec, link: StudyLink, *, experiment: str, seed: int) -> None:
        from autofinetune.search.algorithms import make_sampler
        from autofinetune.search.space import optuna_distributions
        from autofinetune.store.warm_start import warm_start_sources

        super().__init__(
            # The whole space, for OptunaSearch's checks; suggest() asks a trial define-by-run.
            space=optuna_distributions(spec),
            # Several objectives: Ray's OptunaSearch takes lists (and reports no epoch to Optuna).
            metric=spec.objective.names if spec.objective.is_multi else spec.objective.metric,
            mode=spec.objective.modes if spec.objective.is_multi else spec.objective.mode,
            sampler=make_sampler(spec, seed=seed, sources=warm_start_sources(spec)),
            study_name=spec.name,
            storage=link.storage,
        )
        self._spec = spec
        self._experiment = experiment
        #: Tune trial id -> [Optuna trial id, Optuna trial number].
        self._trial_ids: dict[str, list[int]] = {}

    # -- pickling without the storage --

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_storage"] = None
        state["_ot_study"] = None
        state["_ot_trials"] = {}
        sampler = state.get("_sampler")
        if sampler is not None and hasattr(sampler, _SAMPLER_LOCK):
            # NSGA-II's sampler guards its population cache with a lock, which does not pickle.
            sampler = copy.copy(sampler)
            delattr(sampler, _SAMPLER_LOCK)
            state["_sampler"] = sampler
            state[_SAMPLER_LOCK] = True  # given a new lock when unpickled
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        if state.pop(_SAMPLER_LOCK, False):
            setattr(state["_sampler"], _SAMPLER_LOCK, threading.Lock())
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.__getstate__(), file)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as file:
            state = pickle.load(file)
        self.__setstate__(state)
        self._ot_study = None  # reopened from this process's link on first use

    @property
    def _study(self):
        if self._ot_study is None:
            link = get_link(self._study_name)
            self._storage = link.storage
            self._ot_study = optuna.load_study(
                study_name=self._study_name, storage=link.storage, sampler=self._sampler,
                pruner=optuna.pruners.NopPruner(),
            )
        return self._ot_study

    # -- asking --

    # Tune's Searcher annotates dict | None, yet its searchers return Searcher.FINISHED (a str).
    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:  # type: ignore[override]
        from autofinetune.store.study import budget_used, study_budget

        link = get_link(self._study_name)
        if trial_id in self._trial_ids:  # asked again for a trial it already handed out
            optuna_id, number = self._trial_ids[trial_id]
            return self._config(link.storage.get_trial(optuna_id).params, optuna_id, number)
        if link.stop_reason is not None or (link.deadline is not None and time.time() >= link.deadline):
            link.search_finished = True
            return Searcher.FINISHED
        counted, waiting = budget_used(self._study)
        if waiting == 0 and counted >= study_budget(self._study):
            link.search_finished = True
            return Searcher.FINISHED
        # ask() pops a queued trial first (the baseline, a retry), else samples a new one; its
        # parameters are asked for define-by-run, as the Optuna engine does (conditional ones
        # only where their condition holds).
        ot_trial = self._study.ask()
        suggest_params(ot_trial, self._spec)
        optuna_id = storage_id_of(ot_trial)
        link.storage.set_trial_system_attr(optuna_id, RAY_TRIAL_ATTR, {"experiment": self._experiment, "tune_trial": trial_id})
        self._trial_ids[trial_id] = [optuna_id, ot_trial.number]
        return self._config(ot_trial.params, optuna_id, ot_trial.number)

    @staticmethod
    def _config(params: Mapping[str, Any], optuna_id: int, number: int) -> dict[str, Any]:
        return {**params, OPTUNA_TRIAL_ID_KEY: optuna_id, OPTUNA_TRIAL_NUMBER_KEY: number}

    # -- telling --

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        return None  # the trial actor writes each epoch itself, at its global step

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials:
            return
        self._completed_trials.add(trial_id)
        ids = self._trial_ids.get(trial_id)
        if ids is not None:
            self._record_end(ids[0], ids[1], error=error)

    def _record_end(self, optuna_id: int, number: int, *, error: bool) -> None:
        link = get_link(self._study_name)
        storage = link.storage
        frozen = storage.get_trial(optuna_id)
        if frozen.state.is_finished():
            return  # recorded by an earlier driver, before a crash and resume
        outcome = stored_outcome(frozen)
        if outcome is None:
            # The actor never reached an outcome: Ray gave the trial up (actor or node died more
            # than max_failures times) or ended it.
            reason = link.errors.pop(optuna_id, None) or (
                "Ray reported the trial as failed" if error else "Ray ended the trial before its schedule finished"
            )
            if FAIL_REASON_ATTR not in frozen.user_attrs:
                record_ended_trial(link.recording, frozen, reason, kind="lost")
        state = TrialState.FAIL
        value: float | list[float] | None = None
        if outcome is not None and outcome["state"] == "complete" and outcome.get("value") is not None:
            # Every objective's value in a study of several, as the trial path recorded them.
            state = TrialState.COMPLETE
            value = [float(v) for v in outcome["values"]] if outcome.get("values") else float(outcome["value"])
        elif outcome is not None and outcome["state"] == "pruned":
            state = TrialState.PRUNED  # Optuna stores the last intermediate value, as for the Optuna engine
        self._count_errors(link, outcome, storage.get_trial_user_attrs(optuna_id).get(FAIL_REASON_ATTR, ""), error=error)
        try:
            self._study.tell(number, value, state=state, skip_if_finished=True)
        except Exception as exc:  # never stop the search for one trial's end
            logger.warning("could not record the end of trial %d: %s", number, exc)

    @staticmethod
    def _count_errors(link: StudyLink, outcome: Mapping[str, Any] | None, reason: str, *, error: bool) -> None:
        kind = outcome.get("kind") if outcome else None
        if kind == "fatal":
            link.stop_reason = link.stop_reason or reason or "a trial failed with a fatal error"
        elif kind == "unexpected" or (outcome is None and error):
            # Trials Ray gave up on count too: nodes that cannot reach the database or the
            # data fail every trial, each after its retries.
            stop = link.failures.failed(reason)
            if stop is not None and link.stop_reason is None:
                link.stop_reason = stop
        elif outcome is not None:
            link.failures.succeeded()
