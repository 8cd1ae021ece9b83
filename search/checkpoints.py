"""Per-epoch trial checkpoints, so a retried trial resumes where its dead worker stopped.

A checkpoint is keyed by the study and the trial's first number in its retry chain, so every
retry finds it. Files are written atomically (temporary file, then rename), loaded with
`weights_only=True` (no code runs on load), and removed when the trial ends unless kept.
The folder (default `checkpoints/` in the working directory) must be shared by all workers
of a study: `--checkpoint-dir` points at a shared path for many machines.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

DEFAULT_DIR = "checkpoints"
CHECKPOINT_FORMAT = 2  # trainer.engine.CHECKPOINT_FORMAT (not imported: keeps torch lazy here)


class CheckpointStore:
    def __init__(self, root: str | Path | None, study_name: str, keep: bool = False):
        self.dir = Path(root or DEFAULT_DIR) / study_name
        self.keep = keep

    def path(self, chain_root: int) -> Path:
        return self.dir / f"trial-{chain_root}.pt"

    def save(self, chain_root: int, state: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=".pt")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path(chain_root))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load(self, chain_root: int) -> dict[str, Any] | None:
        path = self.path(chain_root)
        if not path.is_file():
            return None
        state = torch.load(path, map_location="cpu", weights_only=True)
        # an older trainer's layout cannot be continued: the retry starts afresh
        return state if state.get("format") == CHECKPOINT_FORMAT else None

    def remove(self, chain_root: int) -> None:
        if not self.keep:
            self.path(chain_root).unlink(missing_ok=True)
