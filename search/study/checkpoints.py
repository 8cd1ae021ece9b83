"""Per-epoch trial checkpoints, so a retried trial resumes where its dead worker stopped.

A checkpoint belongs to a retry chain (keyed by the study and the chain's first trial number,
so every retry finds it) and to one attempt: each attempt writes its own file
(`trial-7.pt` for the first, `trial-7.retry-12.pt` for retry 12), so a worker that lost its
trial while paused can never overwrite the newer attempt's state, and a retry takes the newest
attempt's file that reads. Files are written atomically (temporary file, then rename) and
loaded with `weights_only=True` (no code runs on load).

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
from pathlib import Path
from typing import Any

from search.logs import say
from trainer.config import CHECKPOINT_FORMAT, CHECKPOINT_KEYS

DEFAULT_DIR = "checkpoints"


class CheckpointStore:
    """A study's checkpoint folder: one file per trial attempt, keyed by its retry chain."""

    def __init__(self, root: str | Path | None, study_name: str, keep: bool = False):
        self.dir = Path(root or DEFAULT_DIR) / study_name
        self.keep = keep
        self.write_error: str | None = None  # the failing write's error, said once
        self.discarded: dict[int, str] = {}  # chain root -> why its checkpoint was unusable

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

    def save(self, chain_root: int, state: dict[str, Any], attempt: int | None = None) -> bool:
        """Writes the attempt's checkpoint; False (said once, with errno and path) when the
        disk refuses it: the trial trains on without crash safety."""
        import torch

        buffer = io.BytesIO()
        torch.save(state, buffer)  # serialised in memory: a write error is then an OSError
        target, tmp = self.path(chain_root, attempt), None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=".pt")
            with os.fdopen(fd, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            error = f"{exc.strerror or exc}, errno {exc.errno}"
            if self.write_error != error:
                say(f"cannot write checkpoint {target.absolute()} ({error}); trial {chain_root} trains on "
                     "without crash safety until a write succeeds")
            self.write_error = error
            return False
        if self.write_error is not None:
            say(f"checkpoints are written again ({target})")
            self.write_error = None
        return True

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

    def remove(self, chain_root: int) -> None:
        if self.keep:
            return
        for _, path in self.files(chain_root):
            try:
                path.unlink(missing_ok=True)
            except OSError:  # a read-only or vanished share: the files are only left behind
                pass


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
