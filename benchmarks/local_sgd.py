"""Batched local SGD: the K=8 step time against 8 x the K=1 step time, one process.

Each step of K workers runs as one vmapped computation; a Python loop over K models would take
about K times the K=1 step. A ratio below 1 is what batching buys.

    python benchmarks/local_sgd.py [--local-batch 64] [--epochs 1] [--augment none]
"""

from __future__ import annotations

import argparse
import math

from trainer import TrainConfig, train
from trainer.runtime import tune_malloc


def step_time(k: int, local_batch: int, epochs: int, augment: str) -> float:
    config = TrainConfig(dataset="synthetic", optimizer="sgdm", epochs=epochs, augment=augment,
                         batch_size=k * local_batch, local_workers=k, local_steps=8,
                         diverge_factor=1e9)
    result = train(config)
    shard = round(result.history[0]["images_per_s"] * result.history[0]["seconds"]) // k
    steps = math.ceil(shard / local_batch) * epochs
    return sum(h["seconds"] for h in result.history) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--local-batch", type=int, default=64)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--augment", default="none")
    args = p.parse_args()
    tune_malloc()
    t1 = step_time(1, args.local_batch, args.epochs, args.augment)
    t8 = step_time(8, args.local_batch, args.epochs, args.augment)
    print(f"K=1 step: {t1 * 1000:.1f} ms   K=8 step: {t8 * 1000:.1f} ms   "
          f"8 x K=1: {8 * t1 * 1000:.1f} ms (local batch {args.local_batch}, synthetic data)")
    print(f"ratio_k8_vs_8x_k1: {t8 / (8 * t1):.3f}")


if __name__ == "__main__":
    main()
