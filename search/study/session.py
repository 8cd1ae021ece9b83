"""One trial attempt: `TrialRunner.begin(trial)` samples an asked trial, finds its checkpoint and
opens (or reopens) its MLflow run; the `TrialSession` it returns reports each epoch (report ->
should_prune -> TrialPruned), checkpoints, and ends the trial's run. Fenced: a session whose
attempt was taken over while its worker was unresponsive writes nothing more.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import optuna

from search import optuna_seam
from search.errors import AttemptLost
from search.inputs.constraints import record_for_dashboard, violations
from search.inputs.objectives import DEFAULT as DEFAULT_OBJECTIVES
from search.inputs.objectives import objective_values
from search.inputs.settings import CONFIG_ATTR
from search.inputs.space import Space
from search.inputs.values import AUTO_LONGEST
from search.logs import say
from search.optuna_seam import StorageBusy, no_waiting
from search.study.checkpoints import CheckpointStore, due
from search.study.recovery import chain_root, mark_worker
from search.tracking import RUN_ATTR
from search.tracking.client import PendingRun, Tracker, run_id_of
from trainer import TrainConfig
from trainer.config import never_averages
from trainer.errors import ConfigError


def compact_config(config: TrainConfig) -> dict[str, Any]:
    """The settings that differ from the defaults (TrainConfig fills the rest back in): a short
    trial attribute in optuna-dashboard instead of every knob."""
    defaults = TrainConfig().to_dict()
    return {k: v for k, v in config.to_dict().items() if v != defaults[k]}


class TrialRunner:
    """What every trial of a worker shares: the space, overrides, MLflow and checkpoints.
    `begin(trial)` turns an asked Optuna trial into a TrialSession, packed or not."""

    def __init__(self, space: Space, overrides: dict[str, Any], tracker: Tracker,
                 parent_run_id: str, checkpoints: CheckpointStore | None = None,
                 reaper: Callable[[optuna.Study], Any] | None = None,
                 objectives: list[str] | None = None, constraints: list[str] | None = None,
                 checkpoint_every: tuple[str, float] = ("auto", AUTO_LONGEST),
                 task: dict[str, str] | None = None):
        self.space, self.overrides = space, overrides
        self.task = task  # a launcher's mark of the task that runs this worker
        self.checkpoint_every = checkpoint_every  # ("auto" | "epochs" | "seconds", N or S)
        self.checkpoint_cost = 0.0  # seconds a trial's checkpoint holds the loop (recent mean)
        self.objectives = objectives or list(DEFAULT_OBJECTIVES)
        self.constraints = constraints or []
        self.tracker, self.parent_run_id = tracker, parent_run_id
        self.checkpoints, self.reaper = checkpoints, reaper

    def begin(self, trial: optuna.Trial) -> TrialSession:
        """Samples the trial, finds its chain's checkpoint, opens (or reopens) its MLflow run.
        Raises ConfigError (recorded as the trial's fail_reason) for an impossible combination.
        Its parameters and attributes reach the storage in one write (`one_write`)."""
        with optuna_seam.one_write(trial):
            session = self._begin(trial)
        if self.reaper is not None:  # after: a retry has this worker's marks by then, not the
            self.reaper(trial.study)  # dead one's it was copied with
        return session

    def _begin(self, trial: optuna.Trial) -> TrialSession:
        mark_worker(trial, self.task)
        if optuna_seam.drawn_ahead(trial):  # --sample-ahead: from the study one epoch earlier
            trial.set_user_attr("drawn_ahead", True)
        values = {**self.space.sample(trial), **self.overrides}
        try:
            config = TrainConfig.from_dict(values)
        except ConfigError as exc:
            trial.set_user_attr("fail_reason", f"invalid configuration: {exc}")
            raise
        if (steps := never_averages(config)) is not None:  # H longer than the whole run
            say(f"trial {trial.number} averages every {config.local_steps} local steps but runs "
                f"only about {steps}: its workers never average (0 communication rounds)")
        root = chain_root(optuna_seam.frozen(trial))  # a retry's history: set when it was made
        resume = self.checkpoints.load(root) if self.checkpoints else None
        discarded = self.checkpoints.discarded.pop(root, None) if self.checkpoints else None
        label = trial.user_attrs.get("label")
        run_name = f"{label} · trial-{root}" if label else f"trial-{root}"
        run_id, logged = self._open_run(trial, config, root, resume, run_name)
        trial.set_user_attr(CONFIG_ATTR, compact_config(config))
        if resume is not None:
            trial.set_user_attr("resumed_from_epoch", int(resume["epoch"]))
        if discarded is not None:  # said once by the store; the run and the trial say it too
            start = f"epoch {int(resume['epoch'])}" if resume else "epoch 0"
            say(f"trial {trial.number} (retry of trial {root}) starts again from {start}")
            trial.set_user_attr("checkpoint_discarded", discarded)
            self.tracker.tag(run_id, "checkpoint_discarded", f"{discarded}; restarted from {start}")
        session = TrialSession(self, trial, config, resume, run_id, root, run_name)
        session.logged = logged
        return session

    def _open_run(self, trial: optuna.Trial, config: TrainConfig, root: int,
                  resume: dict[str, Any] | None, run_name: str) -> tuple[str | PendingRun, int]:
        """A retry reopens its chain's run (returns it and the epochs it already holds, which
        the retry then logs nothing twice of); a new trial's run is created by the tracker's
        sender thread while the trial starts training (a PendingRun until then)."""
        run_id = (resume or {}).get("mlflow_run_id") or trial.user_attrs.get(RUN_ATTR)
        if run_id and root != trial.number:
            self.tracker.reopen(run_id, trial.number, run_name)
            trial.set_user_attr(RUN_ATTR, run_id)
            return run_id, self.tracker.last_step(run_id, "val_acc")
        label = trial.user_attrs.get("label")
        tags = {"optimizer": config.optimizer, "space_hash": self.space.hash}
        params = config.to_dict()
        if label:
            tags["label"] = str(label)
            if trial.user_attrs.get("reported") is not None:  # the notes' number beside ours
                params["reported_val_acc"] = trial.user_attrs["reported"]
        return self.tracker.start_trial(self.parent_run_id, trial.number, params, tags,
                                        self.space.text, run_name,
                                        on_created=self._created(trial, root)), 0

    def _created(self, trial: optuna.Trial, root: int) -> Callable[[str], None]:
        """What the sender thread records once a new trial's run exists: the run on the trial
        (straight to the storage, so a worker killed right after still leaves it) and the
        dashboard note. A trial that ended or was lost meanwhile keeps what it has."""

        def created(run_id: str) -> None:
            storage = optuna_seam.storage_of(trial.study)
            try:
                with no_waiting(storage):
                    storage.set_trial_user_attr(optuna_seam.trial_id(trial), RUN_ATTR, run_id)
            except Exception:
                return
            if root == trial.number:
                self.note(trial, run_id)

        return created

    def note(self, trial: optuna.Trial, run_id: str, more: str = "") -> None:
        """The trial's note in optuna-dashboard (Markdown): its MLflow run as a link, and
        `more` (what the dashboard cannot show itself, e.g. that the trial is infeasible)."""
        from optuna_dashboard import save_note

        url = self.tracker.run_url(run_id)
        where = (f"[MLflow run {run_id[:8]}]({url})" if url else
                 f"MLflow run `{run_id}` in {self.tracker.uri} (`mlflow ui --backend-store-uri "
                 f"{self.tracker.uri}`, then Experiments → {self.tracker.study_name})")
        try:
            save_note(trial, more + f"**{where}** — per-epoch metrics, params, dataset.")
        except Exception:  # a note is a convenience; never fail a trial for it
            pass


class TrialSession:
    """One trial attempt in flight: per-epoch reporting (report -> should_prune -> TrialPruned),
    its checkpoints, and the end of its MLflow run. Pruned trials end their run FINISHED and
    named so, diverged or broken ones FAILED with the reason (also the trial's `fail_reason`).

    Fencing: a worker paused past the heartbeat's grace (a suspended VM, a partition) has lost
    its attempt to a retry by the time it wakes. Before each epoch's side effects (MLflow
    metrics, Optuna report, checkpoint) and before any end, the session confirms that its
    attempt is still RUNNING in the storage (the pack's one read per epoch, or its own); a lost
    one raises AttemptLost and writes nothing more. Checkpoints are per attempt and checked
    again by the writer just before a file lands, so a write racing the takeover can neither
    overwrite the retry's nor land after the loss."""

    def __init__(self, runner: TrialRunner, trial: optuna.Trial, config: TrainConfig,
                 resume: dict[str, Any] | None, run_id: str | PendingRun, root: int,
                 run_name: str):
        self.runner, self.trial, self.config = runner, trial, config
        self.resume, self.run_id, self.root = resume, run_id, root
        self.run_name = run_name
        self.contact = time.monotonic()  # the last time the storage confirmed the attempt
        self.crash_safe = True
        self.owed: list[dict[str, Any]] = []  # epochs not yet reported (a storage outage)
        self.logged = 0  # the last epoch its MLflow run holds (a retry's predecessor's)
        self.recorded = isinstance(run_id, str)  # the run is on the trial (RUN_ATTR)
        self.written = -1  # the epoch whose report the pack's one write made (`prewrite`)
        self.saved_epoch = int(resume["epoch"]) if resume else 0  # the last checkpoint's
        self.saved_at = time.monotonic()

    def owned(self, known: bool | None = None) -> bool:
        """True while this attempt is still the trial's RUNNING attempt in the storage (`known`:
        what one read for the whole pack found, instead of a read of its own)."""
        if known is None:
            known = (optuna_seam.get_trial(self.trial.study, self.trial).state
                     == optuna.trial.TrialState.RUNNING)
        if known:
            self.contact = time.monotonic()
            return True
        return False

    def confirm(self, known: bool | None = None) -> None:
        if not self.owned(known):
            raise AttemptLost(self.lost_line())

    def lost_line(self) -> str:
        return (f"trial {self.trial.number} was taken over by another worker while this one was "
                f"unresponsive (no contact for {time.monotonic() - self.contact:.0f} s); "
                "dropping it")

    def on_epoch(self, metrics: dict[str, Any], last: bool = False,
                 running: bool | None = None) -> None:
        """The epoch's report: confirm the attempt, log it to MLflow, report it to Optuna, ask
        the pruner. While the storage does not answer (an outage, within --storage-patience)
        the epoch is owed instead and training goes on; owed epochs are sent, in order, once
        the storage confirms the attempt again (a lost one sends nothing). The last epoch
        waits for the storage: the trial cannot end without it. `running`: whether the pack's
        one fencing read found the attempt RUNNING (None: read it here)."""
        self.owed.append(metrics)
        try:
            with no_waiting(optuna_seam.storage_of(self.trial.study)) if not last else contextlib.nullcontext():
                self._send_owed(running)
                # the last epoch never prunes: a trial that ran its whole budget has a value
                prune = (not last and len(self.runner.objectives) == 1
                         and self.trial.should_prune())
        except StorageBusy:
            return  # trains on; its checkpoint is its own attempt's file
        if prune:
            raise optuna.TrialPruned(f"pruned at epoch {metrics['epoch']}")

    def prewrite(self, metrics: dict[str, Any]) -> tuple[list, list] | None:
        """This epoch's storage writes for the pack's one write (`optuna_writes.write_reports`):
        its value and, the first time, its MLflow run's id. None when it reports on its own:
        owed epochs, several objectives, a local method's rounds, an epoch reported before."""
        epoch = int(metrics["epoch"])
        if (self.owed or len(self.runner.objectives) > 1 or "comm_rounds" in metrics
                or optuna_seam.reported(self.trial, epoch)):
            return None
        run_id = None if self.recorded else self.run_id.wait(0.0)
        return ([(self.trial, epoch, float(metrics["val_acc"]))],
                [(self.trial, RUN_ATTR, run_id)] if run_id is not None else [])

    def prewritten(self, writes: tuple[list, list]) -> None:
        """The pack's one write made these writes: `on_epoch` does not make them again."""
        self.written = writes[0][0][1]
        self.recorded = self.recorded or bool(writes[1])

    def _send_owed(self, running: bool | None = None) -> None:
        """Confirms the attempt, then reports each owed epoch: Optuna first (it may meet the
        outage again), then MLflow (queued by the tracker, never fails; an epoch its run
        already holds is not logged again, as Optuna keeps an epoch's first report), then
        drops it."""
        self.confirm(running if not self.owed[:-1] else None)  # owed epochs: read again
        self._record_run()
        while self.owed:
            m = self.owed[0]
            if "comm_rounds" in m:
                self.trial.set_user_attr("comm_rounds", m["comm_rounds"])
            if len(self.runner.objectives) > 1:  # Optuna keeps no intermediate values for these
                self.trial.set_user_attr("epochs_run", int(m["epoch"]))
            elif int(m["epoch"]) != self.written:
                self.trial.report(m["val_acc"], m["epoch"])
            if int(m["epoch"]) > self.logged:
                self.runner.tracker.log_epoch(self.run_id, m)
                self.logged = int(m["epoch"])
            self.owed.pop(0)

    def values(self, history: list[dict[str, Any]]) -> list[float]:
        """The trial's objective values, in the study's order."""
        return objective_values(self.runner.objectives, history)

    def checkpoint(self, epoch: int, state_of: Callable[[], dict[str, Any]],
                   in_flight: int = 1) -> None:
        """At the end of `epoch`: the attempt's checkpoint when the cadence
        (`--checkpoint-every`) says it is due; `state_of` copies it from the engine only then.
        The time that takes (the copy and the queueing: what the device waits for) feeds
        `auto`'s cadence."""
        runner = self.runner
        if runner.checkpoints is None or not due(
                runner.checkpoint_every, epoch - self.saved_epoch,
                time.monotonic() - self.saved_at, runner.checkpoint_cost, in_flight):
            return
        started = time.perf_counter()
        self.save(state_of())
        took = time.perf_counter() - started
        runner.checkpoint_cost = took if not runner.checkpoint_cost else (
            0.8 * runner.checkpoint_cost + 0.2 * took)

    def save(self, state: dict[str, Any]) -> None:
        """This attempt's checkpoint now (after `on_epoch` confirmed the attempt), queued for the
        store's background writer (a stop, a PBT copy, or `checkpoint` found it due). A failed
        write is one line from the store; the trial carries `crash_safe: false` from its next
        save until a write succeeds, which `search status` shows."""
        store = self.runner.checkpoints
        if store is None:
            return
        run_id = run_id_of(self.run_id)  # a retry continues this run (unknown yet: its trial's)
        ok = store.submit(self.root, {**state, **({"mlflow_run_id": run_id} if run_id else {})},
                          self.trial.number, self._still_owned)
        self.saved_epoch, self.saved_at = int(state["epoch"]), time.monotonic()
        if ok is not None and ok != self.crash_safe:
            self.crash_safe = ok
            self.trial.set_user_attr("crash_safe", ok)

    def unsaved(self, epoch: int) -> bool:
        """Whether epochs up to `epoch` are not in a checkpoint yet (a stop saves them)."""
        return self.runner.checkpoints is not None and self.saved_epoch < epoch

    def _still_owned(self) -> bool:
        """For the writer, just before a file lands: False only when the storage says the
        attempt is no longer RUNNING (during an outage it writes: the file is its own)."""
        try:
            with no_waiting(optuna_seam.storage_of(self.trial.study)):
                return self.owned()
        except Exception:
            return True

    def _record_run(self, wait: bool = False) -> None:
        """The trial's run on the trial (RUN_ATTR) once the sender has created it: at its first
        report, and before it ends (`wait`: for as long as a run's creation may take)."""
        if self.recorded:
            return
        run_id = self.run_id.wait(600.0 if wait else 0.0)
        if run_id is not None:
            self.trial.set_user_attr(RUN_ATTR, run_id)
            self.recorded = True

    def _settle(self) -> None:
        """Its queued checkpoint on disk, before a retry may read it."""
        if self.runner.checkpoints is not None:
            self.runner.checkpoints.settle(self.root, self.trial.number)

    def lost(self) -> None:
        """The attempt was taken over: its queued checkpoint dropped, its file gone once the
        retry has one of its own."""
        if self.runner.checkpoints is not None:
            self.runner.checkpoints.forget(self.root, self.trial.number)

    def pruned(self, reason: str, epoch: int, word: str = "pruned") -> None:
        """Pruned: a normal end (FINISHED, as Optuna's own MLflow integration ends it), told
        apart from a complete run at a glance by its name's first word (`pruned@2 · trial-6`:
        MLflow's runs table cuts long names, and shows both as Finished; PBT's replaced
        segments say `replaced@4`)."""
        self._record_run(wait=True)
        self.trial.set_user_attr("pruned_reason", reason)
        self.runner.tracker.end_trial(self.run_id, "PRUNED", reason,
                                      run_name=f"{word}@{epoch} · {self.run_name}",
                                      state=f"{word} at epoch {epoch}")
        self._cleanup()

    def interrupted(self, reason: str) -> bool:
        """Stopped by a signal: the checkpoint stays, so the re-queued trial resumes. False
        (nothing written) when the attempt was lost meanwhile."""
        self._settle()
        if not self.owned():
            return False
        self._record_run(wait=True)
        self.trial.set_user_attr("fail_reason", reason)
        self.runner.tracker.end_trial(self.run_id, "KILLED", reason)
        self.runner.tracker.drain(seconds=10)  # closed before the re-queue looks at it
        return True

    def abandoned(self, reason: str) -> None:
        """The storage is gone: no storage write is possible. The run is closed KILLED (sent
        when MLflow answers), the checkpoint stays; the trial, RUNNING in the storage, is found
        stale and retried from it once the storage is back."""
        self._settle()
        self.runner.tracker.end_trial(self.run_id, "KILLED", reason)

    def failed(self, reason: str) -> bool:
        if not self.owned():
            return False
        self._record_run(wait=True)
        self.trial.set_user_attr("fail_reason", reason)
        self.runner.tracker.end_trial(self.run_id, "FAIL", reason,
                                      run_name=f"failed · {self.run_name}")
        self._cleanup()
        return True

    def completed(self, values: list[float], epoch: int,
                  history: list[dict[str, Any]] | None = None) -> None:
        """Complete: its constraints set on the trial (Optuna keeps infeasible trials off the
        front and the best), its run closed FINISHED."""
        self._record_run(wait=True)
        missed = violations(self.runner.constraints, history or [])
        for text, amount in missed.items():
            self.trial.set_constraint(text, amount)
        if missed:  # what optuna-dashboard's plots read (it does not read set_constraint's)
            record_for_dashboard(optuna_seam.storage_of(self.trial.study),
                                 optuna_seam.trial_id(self.trial), list(missed.values()))
        failed = [t for t, v in missed.items() if v > 0]
        if failed:
            self.runner.tracker.tag(self.run_id, "infeasible", ", ".join(failed))
            if run_id_of(self.run_id):
                self.runner.note(self.trial, run_id_of(self.run_id), (
                    f"**Infeasible**: misses {', '.join(f'`{t}`' for t in failed)}, so it is "
                    "not among the study's best trials (`search status`).\n\n"))
        self.runner.tracker.end_trial(self.run_id, "COMPLETE", objectives=dict(
            zip(self.runner.objectives, values, strict=True)), step=epoch,
            state="infeasible" if failed else "complete")  # which: the `infeasible` tag
        self._cleanup()

    def _cleanup(self) -> None:
        if self.runner.checkpoints is not None:
            self.runner.checkpoints.remove(self.root)
