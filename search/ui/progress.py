"""What a running study looks like on the terminal: the progress bar (or, in a log, one line per
finished trial and at most one status line a minute), and the words `run`, `status` and the bar
share for trial states."""

from __future__ import annotations

import datetime
import sys
import threading
import time
from typing import Any

import optuna
from tqdm import tqdm

from search.inputs.constraints import feasible, missed
from search.inputs.objectives import best_first, epochs_run, pareto_numbers, primary, study_objectives
from search.study.budget import ended, finished
from search.study.lineage import DONOR_ATTR, MEMBER_ATTR, REPLACED_BY_ATTR, SCHEDULE_ATTR, schedule_text
from search.study.recovery import owned_by, retried_numbers

State = optuna.trial.TrialState


def trials_word(n: int) -> str:
    """`1 trial`, `3 trials`."""
    return f"{n} trial" if n == 1 else f"{n} trials"


def print_summary(study: optuna.Study) -> None:
    line = f"study {study.study_name}: {describe_counts(state_counts(study))}"
    if len(study.directions) > 1:
        front = sorted(pareto_numbers(study))
        line += f"; Pareto front: {trials_word(len(front))} {front}"
    else:
        try:
            best = study.best_trial
            line += f"; best trial {best.number}: {best.value:.4f} {short_params(best.params)}"
        except ValueError:
            best = None
        if best is not None and best.user_attrs.get(SCHEDULE_ATTR):
            line += ("\nPBT: the best member's schedule: "
                     + schedule_text(best.user_attrs[SCHEDULE_ATTR], short_value))
    print(line)


COUNT_WORDS = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed",
               "RUNNING": "running", "WAITING": "waiting"}


def state_counts(study: optuna.Study) -> dict[str, int]:
    """Trials per state; a failed attempt that was retried (its worker died, or it was stopped)
    counts as RETRIED, not FAIL: its retry stands for it."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    out = dict.fromkeys([*COUNT_WORDS, "RETRIED"], 0)
    for t in trials:
        out["RETRIED" if t.number in retried else t.state.name] += 1
    infeasible = sum(t.state == State.COMPLETE and not feasible(t) for t in trials)
    if infeasible:
        out["INFEASIBLE"] = infeasible
    return out


def describe_counts(counts: dict[str, int]) -> str:
    """The same words in `run`, `status` and the progress line."""
    line = ", ".join(f"{counts[k]} {w}" for k, w in COUNT_WORDS.items())
    if counts.get("INFEASIBLE"):  # complete, but missing a constraint: never among the best
        line = line.replace(" complete,", f" complete ({counts['INFEASIBLE']} infeasible),", 1)
    if counts.get("RETRIED"):
        line += f" ({counts['RETRIED']} attempts retried)"
    return line


def short_value(v: Any) -> str:
    """A sampled value, short: 3.42e-4, 0.9, 128."""
    if not isinstance(v, float):
        return str(v)
    return f"{v:.2e}".replace("e-0", "e-") if 0 < abs(v) < 1e-3 else f"{v:.3g}"


def short_params(params: dict) -> str:
    """A trial's sampled values, short: `lr=3.42e-4 batch_size=128 augment=final`."""
    return " ".join(f"{k}={short_value(v)}" for k, v in params.items())


def duration(seconds: float) -> str:
    """Seconds as a person reads them: 41 s, 12 min, 2.5 h."""
    return f"{seconds:.0f} s" if seconds < 600 else (
        f"{seconds / 60:.0f} min" if seconds < 6000 else f"{seconds / 3600:.1f} h")


def finished_line(t: optuna.trial.FrozenTrial, names: list[str], count: str,
                  best: str | None) -> str:
    """One line per finished trial in a log (at most ~160 characters for the shipped spaces;
    the study's name is on the status lines)."""
    value = (" " + " ".join(f"{n} {v:.4g}" for n, v in zip(names, t.values, strict=True))
             if t.values else "")
    secs = t.duration.total_seconds() if t.duration else 0.0
    # a complete trial shows its values; the others say their state instead
    state = "" if t.state == State.COMPLETE else f" {t.state.name.lower()}"
    if t.state == State.COMPLETE and not feasible(t):  # said first: it is never the best
        state = f" infeasible ({', '.join(missed(t))})"
    ran = "" if t.state == State.COMPLETE else f"{epochs_run(t)} ep, "  # complete: all of them
    return (f"trial {t.number}{state}{value} ({ran}{duration(secs)}): {short_params(t.params)}"
            f"{pbt_words(t)}; {count}" + (f", {best}" if best is not None else ""))


def pbt_words(t: optuna.trial.FrozenTrial) -> str:
    """A PBT segment's place in its member's lineage, for its trial line."""
    a = t.user_attrs
    if MEMBER_ATTR not in a:
        return ""
    words = f" [member {a['pbt_member']}"
    if a.get(DONOR_ATTR) is not None:
        words += f", from trial {a['pbt_parent']} at epoch {a['pbt_start_epoch']}"
    if a.get(REPLACED_BY_ATTR) is not None:
        words += f"; replaced, continues as trial {a['pbt_replaced_by']}"
    return words + "]"


class Progress:
    """What a study is doing, read from the storage (the same for one worker or many).

    On a terminal: a tqdm bar (finished / pruned / failed, best) and the running trials' epoch,
    accuracy and ETA. Elsewhere (a log file, CI, nohup): one line per finished trial and at most
    one status line a minute, so a log grows with the study, not with the clock."""

    def __init__(self, study: optuna.Study, total: int | None, epochs: int,
                 tty: bool | None = None, quiet_seconds: float = 60.0,
                 pids: set[int] | None = None):
        self.study, self.total, self.epochs = study, total, epochs
        self.names = study_objectives(study)
        self.marks: dict[int, tuple[int, datetime.datetime]] = {}  # trial -> (epoch, seen at)
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.seen = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
        self.baseline = set(self.seen)
        # this command's processes: other commands on the study finish trials too, and the
        # count is of this command's --n-trials (None: every trial of the study counts)
        self.pids = pids
        self.quiet_seconds, self.last_line = quiet_seconds, time.monotonic()
        self.bar = (tqdm(total=total, desc=f"study {study.study_name}", unit="trial",
                         file=sys.stderr, dynamic_ncols=True) if self.tty else None)
        self.stop = threading.Event()

    def _running(self, t: optuna.trial.FrozenTrial) -> str | None:
        if not (t.intermediate_values and t.datetime_start):
            return None
        step = max(t.intermediate_values)
        now = datetime.datetime.now()
        seen_step, seen_at = self.marks.get(t.number, (None, now))
        if seen_step != step:  # first sight of this epoch: time per epoch up to here
            self.marks[t.number] = (step, now)
            seen_at = now
        # resumed trials inherit earlier epochs: time only those run since the start
        ran = max(1, step - int(t.user_attrs.get("resumed_from_epoch", 0)))
        per_epoch = (seen_at - t.datetime_start).total_seconds() / ran
        # counts down through an epoch instead of climbing while the epoch runs
        eta = max(0.0, per_epoch * (self.epochs - step) - (now - seen_at).total_seconds())
        return f"ep {step}/{self.epochs} acc {t.intermediate_values[step]:.3f} eta {eta:.0f}s"

    def _mine(self, t: optuna.trial.FrozenTrial) -> bool:
        return self.pids is None or owned_by(t, self.pids)

    def refresh(self) -> None:
        trials = self.study.get_trials(deepcopy=False)
        done = ended(trials, lambda t: t.number not in self.baseline and self._mine(t))
        counts = {s: sum(t.state == s for t in done) for s in (State.COMPLETE, State.PRUNED,
                                                               State.FAIL)}
        # against the study's total, the study's finished trials (any command's); else this
        # command's own
        shown = len(done) if self.total is None else finished(trials)
        # the best of the feasible trials; a multi-objective study has a front, not a best
        complete = [t for t in trials if t.state == State.COMPLETE and t.values and feasible(t)]
        running = [t for t in trials if t.state == State.RUNNING]
        post = {"complete": counts[State.COMPLETE], "pruned": counts[State.PRUNED],
                "failed": counts[State.FAIL]}
        if complete and len(self.names) > 1:
            post["front"] = trials_word(len(self.study.best_trials))
        elif complete:
            post["best"] = f"{primary(min(complete, key=best_first(self.study))):.4f}"
        # the study's best so far; a front is the study's, not the trial's: "front has 2 trials"
        best = (f"best {post['best']}" if "best" in post else
                f"front has {post['front']}" if "front" in post else None)
        if self.bar is not None:
            for t in running[:2]:
                if (text := self._running(t)) is not None:
                    post[f"#{t.number}"] = text
            self.bar.n = shown if self.total is None else min(shown, self.total)
            self.bar.set_postfix(post, refresh=False)
            self.bar.refresh()
            return
        of = f"/{self.total}" if self.total is not None else ""
        for t in sorted((t for t in done if t.number not in self.seen), key=lambda t: t.number):
            self.seen.add(t.number)
            print(finished_line(t, self.names, f"{shown}{of}", best),
                  file=sys.stderr, flush=True)
            self.last_line = time.monotonic()
        if time.monotonic() - self.last_line >= self.quiet_seconds:
            states = ", ".join(f"#{t.number} {self._running(t) or 'starting'}" for t in running)
            print(f"study {self.study.study_name}: {shown}{of} finished, {len(running)} "
                  f"running{': ' + states if states else ''}", file=sys.stderr, flush=True)
            self.last_line = time.monotonic()

    def watch(self, interval: float = 1.0) -> threading.Thread:
        def loop():
            while not self.stop.wait(interval):
                try:
                    self.refresh()
                except Exception:  # a storage blip must not kill the display
                    pass

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self.stop.set()
        try:
            self.refresh()
        finally:
            if self.bar is not None:
                self.bar.close()


