"""One worker: `run_worker` opens the study, sizes its pack, and runs its share of trials through
the worker loop. Every launcher runs this same function (a spawned local process, a Slurm array
task); how a budget is split between workers and who finished what is here too."""

from __future__ import annotations

import dataclasses
import signal

import optuna

from search.inputs.settings import RunSettings
from search.inputs.space import Space
from search.inputs.values import cadence_value
from search.logs import quiet_libraries, say
from search.study.budget import counted, finished, set_total
from search.study.checkpoints import CheckpointStore
from search.study.lifecycle import open_study
from search.study.recovery import STOP, RetryDeadTrial, owned_by, reap_dead_local_trials
from search.study.session import TrialRunner
from search.study.storage import has_heartbeat, wait_for_attr
from search.tracking import PARENT_ATTR
from search.tracking.client import Tracker
from search.worker.ahead import SampleAhead, sample_ahead, wanted
from search.worker.loop import run_trials


def shares(n_trials: int | None, workers: int) -> list[int | None]:
    """Splits a trial budget exactly: trials in total, however many workers (None each without
    one: a study total or a timeout bounds them instead)."""
    if n_trials is None:
        return [None] * workers
    return [n_trials // workers + (i < n_trials % workers) for i in range(workers)]


def finished_by(study: optuna.Study, pids: set[int] | None = None,
                task: dict[str, str] | None = None) -> int:
    """Trials that processes `pids` on this host (or one launcher's task, over its requeues:
    the trial attribute it marks them with; or, with neither, anyone) finished; retried
    attempts not counted."""
    def by(t: optuna.trial.FrozenTrial) -> bool:
        if task is not None:
            return all(t.user_attrs.get(k) == v for k, v in task.items())
        return pids is None or owned_by(t, pids)

    return finished(study.get_trials(deepcopy=False), by)


def trial_device(space: Space, overrides: dict) -> str:
    """The device a worker's trials train on (`cuda:1`, `cpu`)."""
    from trainer.runtime import resolve_device

    return str(resolve_device(str({**space.fixed, **overrides}.get("device", "auto"))))


def auto_pack_choice(space: Space, overrides: dict, n_trials: int | None):
    """`--pack auto`'s choice (`sizing.AutoPack`) on this worker's device, for the largest batch
    its space can draw."""
    from search.worker.sizing import auto_pack

    fixed = {**space.fixed, **overrides}
    batch = next((p for p in space.params if p.name == "batch_size"), None)
    batches = (batch.values() or [batch.high]) if batch is not None else [fixed.get("batch_size", 64)]
    workers = next((p for p in space.params if p.name == "local_workers"), None)
    local = (max(workers.values() or [workers.high]) if workers is not None
             else fixed.get("local_workers", 1))
    device = trial_device(space, overrides)
    if not device.startswith("cuda"):
        return auto_pack(device, int(max(batches)), int(local), n_trials)
    from search.worker.sizing import trial_bytes

    # the heaviest network the space can name: each model choice with every searched argument
    # at its last choice or its high bound
    specs, args, extremes = space.networks(overrides)
    args.update({name: values[-1] for name, values in extremes.items()})
    key = tuple(sorted(args.items()))
    spec = max(specs, key=lambda m: trial_bytes(int(max(batches)), int(local), m, key))
    return auto_pack(device, int(max(batches)), int(local), n_trials, model=spec, model_args=key)


def resolve_auto_pack(space: Space, overrides: dict, n_trials: int | None) -> int:
    """`--pack auto` on this worker's device, said in the worker's log."""
    choice = auto_pack_choice(space, overrides, n_trials)
    if choice.pack > 1:  # on a CPU auto is 1, as without packing: nothing to say
        say(choice.line)
    return choice.pack


def worker_device(index: int, overrides: dict) -> dict:
    """Per-worker device and threads: GPUs round-robin, else the CPU cores split."""
    out = dict(overrides)
    if "device" in out and out["device"] not in ("auto", "cuda"):
        return out
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:
        gpus = 0
    if gpus > 1:
        out["device"] = f"cuda:{index % gpus}"
    return out


def resolve_budget(study: optuna.Study, settings: RunSettings) -> RunSettings:
    """The study's total after this command (`--n-trials`, `--add-trials`) and what is left of
    it for this command's workers to share (`n_trials`), counted once the trials of dead
    workers were re-queued; unchanged for a PBT study (its budget is its population)."""
    if settings.pbt is not None:
        return settings
    total = set_total(study, settings.n_trials, settings.add_trials)
    if total is None:
        return settings
    handler = RetryDeadTrial(settings.max_retry, settings.mlflow_uri)
    if has_heartbeat(settings.storage):
        optuna.storages.fail_stale_trials(study)
    else:
        reap_dead_local_trials(study, handler)
    left = max(0, total - counted(study.get_trials(deepcopy=False)))
    # n_trials: what is left now (0: nothing to run); the workers are bounded by the total
    return dataclasses.replace(settings, study_total=total, n_trials=left)


def start_sample_ahead(settings: RunSettings, space: Space, overrides: dict,
                       n_trials: int | None) -> SampleAhead | None:
    """`--sample-ahead`'s child for a worker with these overrides and (at most) `n_trials`
    trials, where it has trials to draw (not a PBT study's: its population is drawn once),
    drawing a first refill of a pack's width at once."""
    if settings.pbt is not None or n_trials == 0 or settings.sample_ahead == "off":
        return None
    device = trial_device(space, overrides)
    if not wanted(settings.sample_ahead, settings.sampler, device):
        return None
    pack = settings.pack if settings.pack != "auto" else auto_pack_choice(space, overrides, n_trials).pack
    return sample_ahead(settings, device, min(pack, n_trials or pack))


def run_worker(settings: RunSettings, index: int, n_trials: int | None, threads: int | None,
               signals: tuple = (signal.SIGINT, signal.SIGTERM),
               task: dict[str, str] | None = None, ahead: SampleAhead | None = None) -> optuna.Study:
    """One worker: open the study, run its share of trials. Trial failures (divergence, an
    impossible combination) fail that trial only; anything else ends the worker. A launcher's
    task (`task`: the attribute marking its trials, as a Slurm array task's `slurm_task`) that
    runs again after a requeue runs only what its earlier runs left.
    `ahead`: the sampling-ahead child its command started already (else started here)."""
    quiet_libraries()
    if threads:
        import torch

        torch.set_num_threads(threads)
    space = settings.load_space()
    overrides = worker_device(index, settings.overrides)
    if ahead is None:  # starts up while the study opens
        ahead = start_sample_ahead(settings, space, overrides, n_trials)
    try:
        study, _ = open_study(settings, space, worker=index)
        if settings.study_total is not None and n_trials:  # the study's total bounds it instead:
            n_trials = None  # retries of other workers' trials must not use up a share
        if task is not None and n_trials is not None:
            n_trials = max(0, n_trials - finished_by(study, task=task))
        pack = None
        if settings.pbt is None and n_trials != 0:
            pack = settings.pack if settings.pack != "auto" else resolve_auto_pack(space, overrides, n_trials)
            if ahead is not None:  # the first refill's sets: drawing since the start
                ahead.top_up(min(pack, n_trials or pack))
        _run(settings, index, study, space, overrides, n_trials, signals, pack, ahead, task)
    finally:
        if ahead is not None:
            ahead.close()
    return study


def _run(settings: RunSettings, index: int, study: optuna.Study, space: Space, overrides: dict,
         n_trials: int | None, signals: tuple, pack: int | None, ahead: SampleAhead | None,
         task: dict[str, str] | None = None) -> None:
    """`run_worker` once its study is open and its pack sized."""
    tracker = Tracker(settings.mlflow_uri, settings.study_name, settings.command)
    parent = wait_for_attr(study, PARENT_ATTR)
    handler = RetryDeadTrial(settings.max_retry, settings.mlflow_uri)
    # without a heartbeat (the journal file, the gRPC proxy): reap trials of dead processes on
    # this machine instead
    reaper = None if has_heartbeat(settings.storage) else (
        lambda s: reap_dead_local_trials(s, handler))
    runner = TrialRunner(space, overrides, tracker, parent,
                         CheckpointStore(settings.checkpoint_dir, settings.study_name,
                                         settings.keep_checkpoints), reaper, settings.objectives,
                         settings.constraints, cadence_value(settings.checkpoint_every), task)
    if reaper is not None:
        reaper(study)
    if n_trials == 0:  # only tidy up (stale trials failed and re-queued)
        optuna.storages.fail_stale_trials(study)
        return
    STOP.install(signals)
    try:
        if settings.pbt is not None:  # the population is the pack and the budget
            from search.inputs.pbt import Pbt
            from search.worker.pbt import PbtLoop
            from search.worker.pbt_shared import SharedPbtLoop

            pbt = Pbt(**settings.pbt)
            if pbt.workers > 1:  # the population shared by the command's workers
                SharedPbtLoop(study, runner, pbt, settings.timeout, handler, settings.stop_within,
                              settings.seed, worker=index, workers=pbt.workers).run()
            else:
                PbtLoop(study, runner, pbt, settings.timeout, handler, settings.stop_within,
                        settings.seed).run()
        else:
            run_trials(study, runner, pack, n_trials, settings.timeout, handler,
                       settings.stop_within, settings.ramp, settings.study_total, ahead)
        if STOP.requested:  # stopped between trials: nothing to re-queue, still an interruption
            raise KeyboardInterrupt
    finally:
        runner.checkpoints.drain()  # what the background writer holds is on disk
        tracker.drain()
