"""Per-epoch trial checkpoints, so a retried trial resumes where its dead worker stopped.

A checkpoint belongs to a retry chain (keyed by the study and the chain's first trial number,
so every retry finds it) and to one attempt: each attempt writes its own file
(`trial-7.pt` for the first, `trial-7.retry-12.pt` for retry 12), so a worker that lost its
trial while paused can never overwrite the newer attempt's state, and a retry takes the newest
attempt's file that reads. Files are written atomically (temporary file, then rename) and
loaded with `weights_only=True` (no code runs on load).

Writes happen on a background thread while the next epoch trains (`submit`): the state is
copied to host memory, and a newer state of the same attempt replaces one still queued, so a
slow disk costs checkpoints, never device time or memory. Before its file replaces the last
one, a write asks whether its attempt is still the trial's (`still_owned`): a write queued
before the attempt was lost is never written after it. What needs a file settles first: a
stopped trial's retry (`settle`), a trial's end (`remove`), a lost attempt (`forget`, its files
go), the worker's exit (`drain`).

Faults a cluster disk has are one line each, never a crash: an unreadable file (truncated,
garbage) is moved aside (`*.corrupt`) and the next older one, or epoch 0, is used; a failed
write (disk full, permissions) leaves the trial training without crash safety until a write
succeeds again. The folder (default `checkpoints/`) must be shared by all workers of a study:
`--checkpoint-dir` points at a shared path for many machines.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from search.logs import say
from trainer.config import CHECKPOINT_FORMAT, CHECKPOINT_KEYS

DEFAULT_DIR = "checkpoints"
AUTO_SHARE = 0.02  # `--checkpoint-every auto`: checkpoints take at most this share of the time


def due(cadence: tuple[str, float], epochs_since: int, seconds_since: float, cost: float,
        in_flight: int) -> bool:
    """Whether a trial checkpoints at this epoch's end. `cadence` is ("epochs", N), ("seconds",
    S) or ("auto", S): every epoch while the worker's checkpoints (`cost` seconds each on the
    critical path, `in_flight` of them per epoch) take under AUTO_SHARE of its time, less often
    where epochs are short (a wide pack on a fast device), and at least every S seconds."""
    kind, every = cadence
    if epochs_since < 1:
        return False
    if kind == "epochs":
        return epochs_since >= every
    if kind == "seconds":
        return seconds_since >= every
    return seconds_since >= min(every, cost * max(1, in_flight) / AUTO_SHARE)


class CheckpointStore:
    """A study's checkpoint folder: one file per trial attempt, keyed by its retry chain."""

    def __init__(self, root: str | Path | None, study_name: str, keep: bool = False):
        self.dir = Path(root or DEFAULT_DIR) / study_name
        self.keep = keep
        self.write_error: str | None = None  # the failing write's error, said once
        self.discarded: dict[int, str] = {}  # chain root -> why its checkpoint was unusable
        self.writer = _Writer(self)

    def path(self, chain_root: int, attempt: int | None = None) -> Path:
        if attempt is None or attempt == chain_root:
            return self.dir / f"trial-{chain_root}.pt"
        return self.dir / f"trial-{chain_root}.retry-{attempt}.pt"

    def files(self, chain_root: int) -> list[tuple[int, Path]]:
        """The chain's checkpoint files as (attempt, path), newest attempt first."""
        pattern = re.compile(rf"trial-{chain_root}(?:\.retry-(\d+))?\.pt")
        found = []
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                if m := pattern.fullmatch(p.name):
                    found.append((int(m.group(1) or chain_root), p))
        return sorted(found, reverse=True)

    def save(self, chain_root: int, state: dict[str, Any], attempt: int | None = None,
             still_owned: Callable[[], bool] | None = None) -> bool | None:
        """Writes the attempt's checkpoint now; False (said once, with errno and path) when the
        disk refuses it: the trial trains on without crash safety. None, nothing written,
        when `still_owned` says the attempt was lost meanwhile."""
        return self._write(self.path(chain_root, attempt), state, f"trial {chain_root}",
                           still_owned)

    def _write(self, target: Path, state: dict[str, Any], whose: str,
               still_owned: Callable[[], bool] | None = None) -> bool | None:
        import torch

        buffer = io.BytesIO()
        torch.save(state, buffer)  # serialised in memory: a write error is then an OSError
        tmp = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".tmp-{target.stem}-", suffix=".pt")
            with os.fdopen(fd, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            if still_owned is not None and not still_owned():
                Path(tmp).unlink(missing_ok=True)
                return None
            os.replace(tmp, target)
        except OSError as exc:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            error = f"{exc.strerror or exc}, errno {exc.errno}"
            if self.write_error != error:
                say(f"cannot write checkpoint {target.absolute()} ({error}); {whose} trains on "
                     "without crash safety until a write succeeds")
            self.write_error = error
            return False
        if self.write_error is not None:
            say(f"checkpoints are written again ({target})")
            self.write_error = None
        return True

    # --- PBT across workers: a member's state at a generation's epoch, for other workers ---

    def generation_path(self, member: int, epoch: int) -> Path:
        return self.dir / "pbt" / f"member-{member}.epoch-{epoch}.pt"

    def save_generation(self, member: int, epoch: int, state: dict[str, Any]) -> bool:
        """The member's state at `epoch`, written now (atomically), for exploits elsewhere;
        False (one line from `save`) when the disk refuses it."""
        return self._write(self.generation_path(member, epoch), state, f"member {member}") is True

    def load_generation(self, member: int, epoch: int) -> dict[str, Any] | None:
        state, problem = _read(self.generation_path(member, epoch))
        if state is None:
            say(f"PBT: member {member}'s state at epoch {epoch} cannot be read ({problem})")
        return state

    def remove_generations(self, member: int, before: int) -> None:
        """The member's published states older than epoch `before` (no step reads them)."""
        folder = self.dir / "pbt"
        if self.keep or not folder.is_dir():
            return
        pattern = re.compile(rf"(?:\.tmp-)?member-{member}\.epoch-(\d+)[.-].*")
        for path in folder.iterdir():  # with what a killed writer left half written
            m = pattern.fullmatch(path.name)
            if m and int(m.group(1)) < before:
                path.unlink(missing_ok=True)

    def load(self, chain_root: int) -> dict[str, Any] | None:
        """The newest attempt's checkpoint that reads; an unreadable one is moved aside with
        one line (its reason kept in `discarded`), and the next older one is tried."""
        for _, path in self.files(chain_root):
            state, problem = _read(path)
            if state is not None:
                return state
            aside = path.with_name(path.name + ".corrupt")
            try:
                os.replace(path, aside)
                where = f"moved aside to {aside.name}"
            except OSError as exc:
                where = f"could not be moved aside ({exc.strerror})"
            say(f"checkpoint {path.absolute()} cannot be used ({problem}); {where}")
            self.discarded[chain_root] = f"{path.name}: {problem}"
        return None

    def submit(self, chain_root: int, state: dict[str, Any], attempt: int,
               still_owned: Callable[[], bool] | None = None) -> bool | None:
        """Queues the attempt's checkpoint for the background writer (its tensors copied to
        host memory first); returns how the attempt's previous write went (None: none yet)."""
        return self.writer.submit((chain_root, attempt), _to_host(state), still_owned)

    def settle(self, chain_root: int, attempt: int) -> None:
        """Waits until the attempt's queued checkpoint is on disk (a retry is about to read it)."""
        self.writer.wait(lambda key: key == (chain_root, attempt))

    def forget(self, chain_root: int, attempt: int) -> None:
        """A lost attempt: its queued write dropped; unless checkpoints are kept, its file goes
        once a newer attempt has one (until then it is what the chain resumes from; the chain's
        end removes it)."""
        self.writer.cancel(lambda key: key == (chain_root, attempt))
        if not self.keep and any(a > attempt for a, _ in self.files(chain_root)):
            self.path(chain_root, attempt).unlink(missing_ok=True)

    def drain(self) -> None:
        """Waits for every queued write (a worker's exit)."""
        self.writer.wait(lambda key: True)

    def remove(self, chain_root: int) -> None:
        """The trial ended: its chain's queued writes dropped and, unless kept, its files."""
        self.writer.cancel(lambda key: key[0] == chain_root)
        if self.keep:
            return
        half = re.compile(rf"\.tmp-trial-{chain_root}[.-].*")  # a killed writer's, half written
        leftovers = [p for p in self.dir.iterdir() if half.fullmatch(p.name)] \
            if self.dir.is_dir() else []
        for path in [p for _, p in self.files(chain_root)] + leftovers:
            try:
                path.unlink(missing_ok=True)
            except OSError:  # a read-only or vanished share: the files are only left behind
                pass


def _to_host(tree: Any) -> Any:
    """The state with every tensor in host memory (a no-op for CPU tensors)."""
    if isinstance(tree, dict):
        return {k: _to_host(v) for k, v in tree.items()}
    if hasattr(tree, "device") and getattr(tree.device, "type", "cpu") != "cpu":
        return tree.to("cpu")
    return tree


class _Writer:
    """The store's background thread: one queued state per attempt (the newest), written in
    the order first queued; `wait` and `cancel` take a predicate over (chain root, attempt)."""

    def __init__(self, store: CheckpointStore):
        self.store = store
        self.cond = threading.Condition()
        self.queue: dict[tuple[int, int], tuple[dict, Callable[[], bool] | None]] = {}
        self.busy: tuple[int, int] | None = None
        self.outcome: dict[tuple[int, int], bool] = {}
        self.thread: threading.Thread | None = None

    def submit(self, key: tuple[int, int], state: dict, still_owned) -> bool | None:
        with self.cond:
            self.queue.pop(key, None)  # a newer state of the same attempt replaces the queued one
            self.queue[key] = (state, still_owned)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, daemon=True,
                                               name="checkpoint-writer")
                self.thread.start()
            self.cond.notify_all()
            return self.outcome.get(key)

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.queue:
                    self.cond.wait()
                key = next(iter(self.queue))
                state, still_owned = self.queue.pop(key)
                self.busy = key
            try:
                ok = self.store.save(key[0], state, attempt=key[1], still_owned=still_owned)
            except Exception as exc:  # never a traceback from the thread; the trial trains on
                say(f"checkpoint of trial {key[0]} not written ({type(exc).__name__}: {exc})")
                ok = False
            with self.cond:
                if ok is not None:
                    self.outcome[key] = ok
                self.busy = None
                self.cond.notify_all()

    def wait(self, match: Callable[[tuple[int, int]], bool]) -> None:
        with self.cond:
            while any(match(k) for k in self.queue) or (self.busy is not None and match(self.busy)):
                self.cond.wait()

    def cancel(self, match: Callable[[tuple[int, int]], bool]) -> None:
        with self.cond:
            for key in [k for k in self.queue if match(k)]:
                del self.queue[key]
            while self.busy is not None and match(self.busy):
                self.cond.wait()


def _read(path: Path) -> tuple[dict[str, Any] | None, str]:
    """(state, "") or (None, what is wrong), in words a user can act on."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        text = text.split(". ")[0]  # torch's first sentence; the rest is advice for its own bugs
        if "weights_only" in str(exc) or "Unpickl" in type(exc).__name__:
            text = "not a checkpoint this trainer wrote: its contents were refused"
        return None, text[:200]
    if not isinstance(state, dict):
        return None, f"holds a {type(state).__name__}, not a checkpoint"
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        return None, f"incomplete: no {', '.join(missing)}"
    if state["format"] != CHECKPOINT_FORMAT:  # an older trainer's layout cannot be continued
        return None, f"format {state['format']} from an older trainer (this one reads {CHECKPOINT_FORMAT})"
    return state, ""
