"""The training loop: `train(config, on_epoch)`, one trial on the stacked engine.

After each epoch the validation split is evaluated and `on_epoch(metrics)` is called; it may
return True to stop, or raise (the search half raises optuna.TrialPruned through here).
Packed trials use `trainer.engine.Engine` directly; a run alone is its one-member case.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trainer.config import TrainConfig, pack_key
from trainer.engine import Diverged, Engine
from trainer.runtime import prepare, prepare_sharing

EpochCallback = Callable[[dict[str, Any]], bool | None]
CheckpointCallback = Callable[[dict[str, Any]], None]

__all__ = ["Diverged", "TrainResult", "replay", "train"]


@dataclass
class TrainResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False

    @property
    def epochs(self) -> int:
        return len(self.history)

    @property
    def val_acc(self) -> float:
        return self.history[-1]["val_acc"] if self.history else float("nan")

    @property
    def best_val_acc(self) -> float:
        return max((h["val_acc"] for h in self.history), default=float("nan"))

    def to_dict(self) -> dict[str, Any]:
        return {"val_acc": self.val_acc, "best_val_acc": self.best_val_acc, "epochs": self.epochs,
                "stopped_early": self.stopped_early,
                "history": self.history}


def train(config: TrainConfig, on_epoch: EpochCallback | None = None, holdout: str = "val",
          resume: dict[str, Any] | None = None,
          on_checkpoint: CheckpointCallback | None = None) -> TrainResult:
    """Trains LeNet-5 as `config` says, calling `on_epoch(metrics)` after every epoch.

    metrics: epoch (1-based), train_loss, train_acc, val_loss, val_acc, lr, seconds,
    images_per_s (and comm_rounds for local methods). After `on_epoch` accepts an epoch,
    `on_checkpoint(state)` receives the trial's checkpoint (`Engine.state`: tensors and plain
    data, loadable with weights_only=True); `resume=state` continues such a run bit for bit.
    Raises Diverged when the training loss stops being finite or explodes.
    """
    engine = Engine(prepare(config, holdout))
    member = engine.add(config, resume)
    result = TrainResult(history=member.history)
    while member.epoch < config.epochs:
        [(_, metrics, error)] = engine.run_epoch()
        if error is not None:
            raise error
        if on_epoch is not None and on_epoch(metrics):
            result.stopped_early = True
            break
        if on_checkpoint is not None:
            on_checkpoint(engine.state(member))
    return result


def replay(segments: list[tuple[TrainConfig, int]], on_epoch: EpochCallback | None = None,
           holdout: str = "val", on_checkpoint: CheckpointCallback | None = None) -> TrainResult:
    """Trains one run through a schedule: each (config, last epoch) segment goes on from the
    state the previous one left, with its own per-trial settings (a PBT member's lineage, as
    Ray Tune's PopulationBasedTrainingReplay). A segment of another shape (`pack_key`: a
    batch size or augmentation its exploit copied or explore drew) goes on in an engine of
    its shape, over the same data."""
    setup = prepare(segments[0][0], holdout)
    engine = Engine(setup)
    state: dict[str, Any] | None = None
    history: list[dict[str, Any]] = []
    for config, last in segments:
        if pack_key(config) != engine.key:
            engine = Engine(prepare_sharing(config, [setup], holdout))
        member = engine.add(config, state)
        while member.epoch < last:
            [(_, metrics, error)] = engine.run_epoch()
            if error is not None:
                raise error
            if on_epoch is not None:
                on_epoch(metrics)
        state, history = engine.state(member), member.history
        engine.remove(member)
    if on_checkpoint is not None and state is not None:
        on_checkpoint(state)
    return TrainResult(history=history)
