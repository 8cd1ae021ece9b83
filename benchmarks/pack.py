"""Packed trials against the same trials one after another: trial-epochs per second.

The same P trials (synthetic CIFAR-shaped data, batch 64, the `final` augmentation, SGDM with a
different lr / momentum / weight decay / seed per trial) are trained one after another, each
alone on the stacked engine (what `search run` does without --pack), and then as one pack of P
(`search run --pack P`), in the same process. Evaluation on the validation split is included.

    python benchmarks/pack.py [--quick] [--device cuda] [--packs 1,4,16,64]
                              [--model torchvision:resnet18 | PATH.py:FUNCTION [--model-arg K=V]]

Last line: `pack_speedup_p16: X pack_speedup_p64: Y epoch_s_single: Z`, where epoch_s_single is
one trial's epoch alone, scaled to CIFAR-100's 40,000 training + 10,000 validation images when
the run used fewer (`--quick`, the CPU default).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.against import side_by_side  # noqa: E402
from search.cli.train import model_arg
from trainer import TrainConfig
from trainer.data import Arrays, to_device
from trainer.engine import Engine
from trainer.runtime import Setup, resolve_device, resolve_precision, tune_malloc

CIFAR_TRAIN, CIFAR_VAL = 40_000, 10_000


def synthetic_setup(config: TrainConfig, n_train: int, n_val: int) -> Setup:
    rng = np.random.default_rng(0)

    def split(n: int):
        arrays = Arrays(rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8),
                        rng.integers(0, 100, n).astype(np.int64))
        return to_device(arrays, device)

    device = resolve_device(config.device)
    return Setup(config, device, resolve_precision(config.precision, device), split(n_train),
                 split(n_val), split(1), 100)


def trials(p: int, epochs: int, device: str, precision: str, model: str = "lenet5",
           model_args: dict | None = None) -> list[TrainConfig]:
    rng = np.random.default_rng(p)
    return [TrainConfig(dataset="synthetic", optimizer="sgdm", augment="final", batch_size=64,
                        epochs=epochs, device=device, precision=precision, model=model,
                        model_args=dict(model_args or {}),
                        lr=float(10 ** rng.uniform(-3, -1)), momentum=float(rng.uniform(0.5, 0.95)),
                        weight_decay=float(10 ** rng.uniform(-5, -3)), seed=i, diverge_factor=1e9)
            for i in range(p)]


def timed(setup: Setup, configs: list[TrainConfig]) -> float:
    """Seconds to train `configs` as one pack for their epochs."""
    engine = Engine(setup)
    for c in configs:
        engine.add(c)
    start = time.perf_counter()
    for _ in range(configs[0].epochs):
        engine.run_epoch()  # reads its metrics back, so the device has finished
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small data, P up to 16: a few minutes on CPU")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto")
    p.add_argument("--packs", help="pack sizes (default 1,4,16,64; quick 1,4,16)")
    p.add_argument("--epochs", type=int, help="epochs per trial (default 2; quick 1)")
    p.add_argument("--train-images", type=int,
                   help="training images (default: 40,000 on cuda, 2,048 on cpu; quick 512)")
    p.add_argument("--model", default="lenet5", help="the network (the `model` setting: "
                   "torchvision:resnet18, PATH.py:FUNCTION, ...)")
    p.add_argument("--model-arg", action="append", default=[], metavar="NAME=VALUE",
                   type=model_arg, help="an argument of its factory (YAML value)")
    p.add_argument("--against", metavar="REV", help="also run this at commit REV first; ratios")
    args = p.parse_args()
    if args.against:
        sys.exit(side_by_side(args.against, "pack.py", sys.argv[1:]))
    net = dict(model=args.model, model_args=dict(args.model_arg))
    tune_malloc()
    cuda = args.device.startswith("cuda")
    packs = [int(x) for x in (args.packs or ("1,4,16" if args.quick else "1,4,16,64")).split(",")]
    epochs = args.epochs or (1 if args.quick else 2)
    n_train = args.train_images or (512 if args.quick else CIFAR_TRAIN if cuda else 2048)
    n_val = max(128, n_train // 4)
    base = trials(1, epochs, args.device, args.precision, **net)[0]
    setup = synthetic_setup(base, n_train, n_val)
    print(f"device {setup.device} ({torch.cuda.get_device_name(setup.device) if cuda else 'cpu'}), "
          f"precision {setup.precision}, torch threads {torch.get_num_threads()}, synthetic data: "
          f"{n_train} train / {n_val} val images, batch 64, augment final, {epochs} epoch(s), "
          f"network {args.model}" + (f" {net['model_args']}" if net["model_args"] else ""))
    timed(setup, trials(2, 1, args.device, args.precision, **net))  # warm-up: kernels, allocator
    speedup, single_epoch = {}, None
    for size in packs:
        configs = trials(size, epochs, args.device, args.precision, **net)
        try:
            alone = sum(timed(setup, [c]) for c in configs)
            packed = timed(setup, configs)
        except torch.OutOfMemoryError:
            print(f"P={size:3d}: does not fit on {setup.device}; skipped")
            continue
        if single_epoch is None:
            single_epoch = alone / len(configs) / epochs
        te = size * epochs
        speedup[size] = alone / packed
        print(f"P={size:3d}: one after another {te / alone:7.2f} trial-epochs/s   "
              f"packed {te / packed:7.2f} trial-epochs/s   speedup {alone / packed:5.2f}")
    scale = (CIFAR_TRAIN + CIFAR_VAL) / (n_train + n_val)
    epoch_s = single_epoch * scale if single_epoch is not None else float("nan")
    note = "" if scale == 1 else f" (scaled x{scale:.1f} from {n_train + n_val} images)"
    print(f"one trial alone: {epoch_s:.2f} s per CIFAR-size epoch{note}")

    def fmt(size: int) -> str:
        return f"{speedup[size]:.2f}" if size in speedup else "n/a"

    print(f"pack_speedup_p16: {fmt(16)} pack_speedup_p64: {fmt(64)} epoch_s_single: {epoch_s:.3f}")


if __name__ == "__main__":
    main()
