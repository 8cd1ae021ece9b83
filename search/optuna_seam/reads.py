"""The read half of the seam: trial ids and storages, reads, asks and tells, heartbeats, the
optimize-loop protocol samplers rely on, and samplers' and pruners' per-trial work done once --
each private name of Optuna's with the reason it is needed (see the package's docstring)."""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Iterator
from typing import Any

import optuna
from optuna.search_space.group_decomposed import _GroupDecomposedSearchSpace

# RDBStorage's private methods that Optuna's own _CachedStorage calls on its backend (`study.ask`
# and `tell` go through them): a storage that rides out outages must retry these too.
CACHED_STORAGE_CALLS = ("_create_new_trial", "_get_best_trial_id", "_get_trials",
                        "_set_trial_param")
# RDBStorage's query for trials whose heartbeat is stale: overridden to give workers a grace
# period after a database outage (their missed beats are not deaths).
STALE_TRIALS_QUERY = "_get_stale_trial_ids"


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The study's storage: reads by trial id (fencing, reaping) and heartbeats need it, and
    `Study` does not expose it."""
    return study._storage


def trial_id(trial: optuna.Trial | optuna.trial.FrozenTrial) -> int:
    """A trial's storage id (not its number): the key of every per-trial storage call."""
    return trial._trial_id


def heartbeat_thread(trial: optuna.Trial, study: optuna.Study) -> Any:
    """Optuna's own heartbeat thread for an asked trial (what `optimize` starts per trial); our
    worker loop asks and tells itself, so it starts the beat itself. A no-op thread on storages
    without heartbeats. Start it with `.start()`, end it with `.join()`."""
    from optuna.storages._heartbeat import get_heartbeat_thread

    return get_heartbeat_thread(trial_id(trial), storage_of(study))


@contextlib.contextmanager
def optimize_loop(study: optuna.Study) -> Iterator[None]:
    """Marks the block as Optuna's optimize loop, the protocol samplers rely on: GridSampler
    calls `study.stop()` when its grid is exhausted, which is only allowed inside that loop,
    and sets the flag `stop_requested` reads."""
    study._thread_local.in_optimize_loop, study._stop_flag = True, False
    try:
        yield
    finally:
        study._thread_local.in_optimize_loop = False


def stop_requested(study: optuna.Study) -> bool:
    """True once a sampler (or a callback) called `study.stop()` inside `optimize_loop`."""
    return bool(study._stop_flag)


def get_trial(study: optuna.Study, trial: optuna.Trial | optuna.trial.FrozenTrial
              ) -> optuna.trial.FrozenTrial:
    """One trial read fresh from the storage (one query: fencing checks a trial's state every
    epoch, and `study.get_trials` would read them all)."""
    return storage_of(study).get_trial(trial_id(trial))


def fail_if_running(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
    """Sets a RUNNING trial of another process to FAIL; False when someone else ended it first
    (the storage locks the row, one side wins). `study.tell` cannot: it refuses trials this
    process did not ask."""
    try:
        return storage_of(study).set_trial_state_values(trial_id(trial),
                                                        state=optuna.trial.TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def reported(trial: optuna.Trial, step: int) -> bool:
    """Whether the trial holds a report at `step` (a retry inherits its predecessor's; Optuna
    keeps an epoch's first report). `Trial` keeps them private."""
    return step in trial._cached_frozen_trial.intermediate_values


_PERCENTILE = threading.Lock()


@contextlib.contextmanager
def percentiles_once(memo: dict) -> Iterator[None]:
    """Inside the block, PercentilePruner's percentile of the complete trials' values at a
    step is computed once per `memo` (a pass over every complete trial, per call otherwise):
    for a caller that hands it the same complete trials until it clears the memo."""
    from optuna.pruners import _percentile as module

    compute = module._get_percentile_intermediate_result_over_trials

    def once(completed: list, direction: Any, step: int, percentile: float, n_min: int) -> float:
        key = (step, direction, percentile, n_min)
        if key not in memo:
            memo[key] = compute(completed, direction, step, percentile, n_min)
        return memo[key]

    with _PERCENTILE:
        module._get_percentile_intermediate_result_over_trials = once
        try:
            yield
        finally:
            module._get_percentile_intermediate_result_over_trials = compute


def ask_waiting(study: optuna.Study) -> optuna.Trial | None:
    """`study.ask()` for a waiting trial only (a retry): None when none waits, where `ask`
    would create a new trial. Claiming it is the storage's atomic WAITING -> RUNNING, as in
    `ask` (`Study._pop_waiting_trial_id`)."""
    study._thread_local.cached_all_trials = None
    trial_id_ = study._pop_waiting_trial_id()
    return None if trial_id_ is None else optuna.Trial(study, trial_id_)


def start_trial(study: optuna.Study, params: dict[str, Any],
                distributions: dict[str, Any], user_attrs: dict[str, Any]) -> optuna.Trial:
    """A RUNNING trial of this process with the given parameters (a PBT segment: a donor's
    values, explored). `enqueue_trial` + `ask` would let any worker, or a waiting retry, take
    its place; the storage's own `create_new_trial` with a template makes it ours at once, and
    `Trial`'s suggest methods then return these values. `Study` keeps its id private."""
    template = optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING, params=params,
                                         distributions=distributions, user_attrs=user_attrs)
    trial_id_ = storage_of(study).create_new_trial(study._study_id, template_trial=template)
    return optuna.Trial(study, trial_id_)


def frozen(trial: optuna.Trial) -> optuna.trial.FrozenTrial:
    """What the storage held for an asked trial when it was asked (its system attributes say
    whether it is a retry), without reading it again. `Trial` keeps it private."""
    return trial._cached_frozen_trial


def tell(study: optuna.Study, trial: optuna.Trial, values: list[float] | None,
         state: optuna.trial.TrialState) -> None:
    """`study.tell` without reading the trial: Optuna reads it first (six queries on a
    database) for what the `Trial` holds already (its reports: a pruned trial's value), and
    `Study.tell` reads it again to return it. Told twice, or after another worker ended it:
    the storage's own check raises UpdateFinishedTrialError."""
    from optuna.study._tell import _tell_with_warning

    with _serving(storage_of(study), trial_id(trial), copy.deepcopy(frozen(trial))):
        _tell_with_warning(study=study, trial=trial, value_or_values=values, state=state)


@contextlib.contextmanager
def _serving(storage: Any, trial_id_: int, trial: optuna.trial.FrozenTrial) -> Iterator[None]:
    """Inside the block, the storage's `get_trial` answers `trial` for that id without a read
    (a worker asks and tells under its own lock; other ids are read as ever)."""
    read = type(storage).get_trial
    storage.get_trial = lambda t: trial if t == trial_id_ else read(storage, t)
    try:
        yield
    finally:
        del storage.get_trial


def ask_new(study: optuna.Study, created: optuna.trial.FrozenTrial | None = None) -> optuna.Trial:
    """`study.ask()` that creates a new trial without first looking for a waiting one (one
    read of every unfinished trial, per ask): for a caller that read, for a whole batch of
    asks, that none waits; or that takes a trial it `created` already (`create_trials`). On a
    database, the `Trial` is made from the trial the create returned, not read back
    (`Trial()` reads it: six queries)."""
    from optuna.storages._cached_storage import _CachedStorage

    study._thread_local.cached_all_trials = None  # as `ask`: the sampler reads afresh
    storage = storage_of(study)
    trial_id_ = (trial_id(created) if created is not None
                 else storage.create_new_trial(study._study_id))
    if not isinstance(storage, _CachedStorage):  # Optuna's cache of a database only
        return optuna.Trial(study, trial_id_)
    with storage._lock:
        made = cached_running(storage, trial_id_)
        made = None if made is None else copy.deepcopy(made)
    if made is None:
        return optuna.Trial(study, trial_id_)
    with _serving(storage, trial_id_, made):
        return optuna.Trial(study, trial_id_)


@contextlib.contextmanager
def reads_once(study: optuna.Study) -> Iterator[None]:
    """Inside the block, the study's trials are read from its database once (at the first
    read), not at every read: Optuna's cache of a database re-reads every unfinished trial
    (a pack's 64, with their reports) each time its sampler reads the study. A batch of trials
    sampled inside sees that read plus what this process writes (`one_write` writes through
    the cache); trials other workers start meanwhile are seen by the next batch, as by a
    sampler that read a moment earlier. Other storages read as they do."""
    storage = storage_of(study)
    read = getattr(storage, "_read_trials_from_remote_storage", None)
    if read is None:
        yield
        return
    done: set[int] = set()

    def once(study_id: int) -> None:
        if study_id not in done:
            read(study_id)
            done.add(study_id)

    storage._read_trials_from_remote_storage = once
    try:
        yield
    finally:
        del storage._read_trials_from_remote_storage


def cached_running(storage: Any, trial_id_: int) -> optuna.trial.FrozenTrial | None:
    """A running trial's copy in Optuna's cache of a database (`_CachedStorage`), or None."""
    study_id, number = storage._trial_id_to_study_id_and_number.get(trial_id_, (None, None))
    trial = storage._studies[study_id].trials.get(number) if study_id is not None else None
    return trial if trial is not None and not trial.state.is_finished() else None


def fix_params(trial: optuna.Trial, params: dict[str, Any] | None) -> None:
    """The trial's suggests return `params` instead of sampling (Optuna's fixed parameters, as
    `enqueue_trial` sets them, for this trial object only: no write); None changes nothing."""
    if not params:
        return
    trial._fixed_params = dict(params)
    trial._search_drawn_ahead = True


def drawn_ahead(trial: optuna.Trial) -> bool:
    """Whether `fix_params` gave the trial its parameters."""
    return getattr(trial, "_search_drawn_ahead", False)


def group_space_once_per_trial(sampler: optuna.samplers.BaseSampler) -> optuna.samplers.BaseSampler:
    """TPESampler(group=True) adds every complete trial's distributions to its group
    decomposition again at every ask: a walk over the whole study, a third of an ask at 2,000
    trials. A trial added twice changes nothing (the groups refine every trial's set of
    parameters already, in the same order), so each trial is added once; the groups, and so
    the samples, are Optuna's own. Other samplers are returned as they are."""
    if getattr(sampler, "_group_decomposed_search_space", None) is not None:
        sampler._group_decomposed_search_space = _GroupsOncePerTrial(
            sampler._group_decomposed_search_space._include_pruned)
    return sampler


class _GroupsOncePerTrial(_GroupDecomposedSearchSpace):
    def __init__(self, include_pruned: bool = False) -> None:
        super().__init__(include_pruned)
        self._added: set[int] = set()

    def calculate(self, study: optuna.Study, use_cache: bool = False) -> Any:
        if self._study_id not in (None, study._study_id):  # as Optuna's
            raise ValueError("`_GroupDecomposedSearchSpace` cannot handle multiple studies.")
        self._study_id = study._study_id
        states = ((optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
                  if self._include_pruned else (optuna.trial.TrialState.COMPLETE,))
        for trial in study._get_trials(deepcopy=False, states=states, use_cache=use_cache):
            if trial._trial_id not in self._added:  # finished: its distributions never change
                self._search_space.add_distributions(trial.distributions)
                self._added.add(trial._trial_id)
        return copy.deepcopy(self._search_space)
