"""Are our trainer's numbers the numbers torch would give? (issue 22)

For each optimiser, N seeds of our trainer (alone: `trainer.loop.train`; packed: P trials on
one stacked engine) against a plain PyTorch loop written the way a user would write it:
`torch.manual_seed(seed)`, LeNet-5, `torch.optim.AdamW` / `torch.optim.SGD` (our single-model
LARS / LAMB for those two, torch has none), `CosineAnnealingLR` stepped per epoch, a shuffled
pass over the same training split in batches of 64 with the last partial batch kept, the same
normalisation, no augmentation. Prints mean ± sd of the final validation accuracy, our
difference to the plain loop and Welch's p per optimiser; last line
`faithfulness: adamw_diff=.. p=.. sgdm_diff=.. p=.. ...` (differences in accuracy points).

    python benchmarks/faithfulness.py                 # digits, 6 epochs, 16 seeds, all four
    python benchmarks/faithfulness.py --optimizers adamw --seeds 8 --variants alone,plain

Not a test: it needs many seeds to say anything (about 2 s per digits run and core here).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from trainer.config import TrainConfig  # noqa: E402

# the settings (lr, momentum or beta1, weight decay); LARS / LAMB at their defaults
SETTINGS = {
    "adamw": {"lr": 2e-3, "momentum": 0.9, "weight_decay": 4e-4},
    "sgdm": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
    "lars": {"lr": 1.0, "momentum": 0.9, "weight_decay": 5e-4},
    "lamb": {"lr": 2e-3, "momentum": 0.9, "weight_decay": 1e-2},
}
VARIANTS = ("plain", "alone", "packed")


def config(optimizer: str, seed: int, epochs: int, dataset: str) -> TrainConfig:
    return TrainConfig(optimizer=optimizer, **SETTINGS[optimizer], epochs=epochs,
                       dataset=dataset, augment="none", seed=seed, device="cpu", threads=1)


def plain_loop(optimizer: str, seed: int, epochs: int, dataset: str) -> float:
    """Final val_acc of a plain PyTorch training loop (only the data split is ours)."""
    from trainer.data import load_dataset, split_indices
    from trainer.model import LeNet5
    from trainer.optim import LAMB, LARS

    torch.set_num_threads(1)
    data = load_dataset(dataset)
    train_idx, val_idx = split_indices(data.train.y, 0.2, 0)

    def tensors(idx):
        x = torch.from_numpy(data.train.x[idx]).float().div(255).sub(0.5).div(0.5)
        return x, torch.from_numpy(data.train.y[idx])

    (x, y), (vx, vy) = tensors(train_idx), tensors(val_idx)
    torch.manual_seed(seed)
    net = LeNet5(data.num_classes)
    s = SETTINGS[optimizer]
    if optimizer == "adamw":
        opt = torch.optim.AdamW(net.parameters(), lr=s["lr"], betas=(s["momentum"], 0.999),
                                weight_decay=s["weight_decay"])
    elif optimizer == "sgdm":
        opt = torch.optim.SGD(net.parameters(), lr=s["lr"], momentum=s["momentum"],
                              weight_decay=s["weight_decay"])
    elif optimizer == "lars":
        opt = LARS(net.parameters(), lr=s["lr"], momentum=s["momentum"],
                   weight_decay=s["weight_decay"])
    else:
        opt = LAMB(net.parameters(), lr=s["lr"], betas=(s["momentum"], 0.999),
                   weight_decay=s["weight_decay"])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    for _ in range(epochs):
        net.train()
        for batch in torch.randperm(len(x)).split(64):
            loss = F.cross_entropy(net(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        schedule.step()
    net.eval()
    with torch.no_grad():
        return (net(vx).argmax(1) == vy).double().mean().item()


def ours_alone(optimizer: str, seed: int, epochs: int, dataset: str) -> float:
    from trainer.loop import train

    return train(config(optimizer, seed, epochs, dataset)).val_acc


def ours_packed(optimizer: str, seeds: list[int], epochs: int, dataset: str) -> list[float]:
    from trainer.engine import Engine
    from trainer.runtime import prepare

    configs = [config(optimizer, s, epochs, dataset) for s in seeds]
    engine = Engine(prepare(configs[0]))
    members = [engine.add(c) for c in configs]
    for _ in range(epochs):
        engine.run_epoch()
    return [m.history[-1]["val_acc"] for m in members]


def job(args: tuple) -> tuple[str, str, list[int], list[float]]:
    variant, optimizer, seeds, epochs, dataset = args
    if variant == "packed":
        return variant, optimizer, seeds, ours_packed(optimizer, seeds, epochs, dataset)
    run = plain_loop if variant == "plain" else ours_alone
    return variant, optimizer, seeds, [run(optimizer, s, epochs, dataset) for s in seeds]


def welch_p(a: list[float], b: list[float]) -> float:
    from scipy.stats import ttest_ind

    return float(ttest_ind(a, b, equal_var=False).pvalue)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--optimizers", default="adamw,sgdm,lars,lamb")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--pack", type=int, default=4, help="trials per pack in the packed variant")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    optimizers, variants = args.optimizers.split(","), args.variants.split(",")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    jobs = []
    for opt in optimizers:
        for variant in variants:
            groups = ([seeds[i:i + args.pack] for i in range(0, len(seeds), args.pack)]
                      if variant == "packed" else [[s] for s in seeds])
            jobs += [(variant, opt, g, args.epochs, args.dataset) for g in groups]
    began = time.perf_counter()
    acc: dict[tuple[str, str], dict[int, float]] = {}
    with ProcessPoolExecutor(args.jobs) as pool:
        for variant, opt, group, values in pool.map(job, jobs):
            acc.setdefault((opt, variant), {}).update(zip(group, values, strict=True))
    print(f"{args.dataset}, {args.epochs} epochs, seeds {seeds[0]}-{seeds[-1]}, no augmentation "
          f"({time.perf_counter() - began:.0f} s)")
    print(f"{'optimiser':<9} {'variant':<8} {'val_acc mean ± sd':>20} {'diff vs plain':>14} "
          f"{'Welch p':>8}")
    last = []
    for opt in optimizers:
        base = [acc[(opt, "plain")][s] for s in seeds] if "plain" in variants else None
        for variant in variants:
            values = [acc[(opt, variant)][s] for s in seeds]
            mean, sd = statistics.mean(values), statistics.stdev(values)
            diff = p = math.nan
            if base is not None and variant != "plain":
                diff, p = 100 * (mean - statistics.mean(base)), welch_p(values, base)
            versus = "" if math.isnan(diff) else f"{diff:>+13.2f}p {p:>8.3f}"
            print(f"{opt:<9} {variant:<8} {mean:>12.4f} ± {sd:.4f} {versus}")
            if variant == "alone":
                last.append(f"{opt}_diff={diff:+.2f} p={p:.3f}")
    print("faithfulness: " + " ".join(last))


if __name__ == "__main__":
    main()
