"""When a run has diverged: its rule (a loss that is not finite, or far above the chance loss
ln(classes)) and the error that says so."""

from __future__ import annotations

import math

from trainer.config import TrainConfig


class Diverged(RuntimeError):
    """The training loss became NaN or infinite, or far above the chance loss."""

    def __init__(self, epoch: int, loss: float):
        what = "is not finite" if not math.isfinite(loss) else f"is {loss:.3g}"
        super().__init__(f"diverged at epoch {epoch}: training loss {what}")
        self.epoch, self.loss = epoch, loss


def divergence(config: TrainConfig, epoch: int, loss: float, num_classes: int) -> Diverged | None:
    """Diverged for a non-finite loss or one above diverge_factor x ln(classes), else None."""
    if not math.isfinite(loss) or loss > config.diverge_factor * math.log(num_classes):
        return Diverged(epoch, loss)
    return None
