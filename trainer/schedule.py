"""Per-epoch learning rate: batch-size scaling, linear warm-up, then cosine annealing.

Cosine follows torch's CosineAnnealingLR closed form, (1 + cos(pi * t / T_max)) / 2 with eta_min
0, so T_max below the epoch count rises again after T_max and T_max above it never reaches zero —
what the notes' team got when they set T_max to 100 or 200 at 150 epochs.
"""

from __future__ import annotations

import math

from trainer.config import TrainConfig


def scaled_lr(config: TrainConfig) -> float:
    """Base lr scaled for the batch size, relative to `base_batch_size` (64 in the notes)."""
    ratio = config.batch_size / config.base_batch_size
    factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[config.lr_scaling]
    return config.base_lr * factor


def lr_at(config: TrainConfig, epoch: int) -> float:
    """Learning rate for 0-based `epoch`."""
    peak = scaled_lr(config)
    warmup = config.warmup_epochs
    if epoch < warmup:
        return peak * (epoch + 1) / (warmup + 1)
    if config.schedule == "constant":
        return peak
    t_max = config.t_max or config.epochs
    return peak * 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / t_max))
