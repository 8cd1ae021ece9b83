"""Training throughput: the notes' way against ours, same synthetic data, same batch count.

The notes' way: torchvision PIL transforms of the `final` preset in a DataLoader, an eager fp32
LeNet-5, batch 64. Ours: the whole dataset as uint8 on the device, batched per-sample
augmentation of the same preset, channels_last, fp32 and bf16 autocast. Also the model alone
(no augmentation) to show augmentation's share of our step.

    python benchmarks/throughput.py [--quick] [--batches N] [--loader-workers W]

Last line: `speedup_fp32: X speedup_bf16: Y aug_share: Z` (aug_share = 1 - ours_fp32 / model_fp32).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.against import side_by_side  # noqa: E402
from trainer.augment import Augment, prepare_eval
from trainer.data import make_synthetic
from trainer.model import LeNet5
from trainer.runtime import autocast, tune_malloc

NOTES_FINAL = transforms.Compose([  # the notes' section 2.1, verbatim
    transforms.RandomHorizontalFlip(),
    transforms.RandomRotation(15),
    transforms.RandomCrop(32, padding=4),
    transforms.RandomPerspective(distortion_scale=0.2, p=0.5),
    transforms.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.2),
    transforms.ToTensor(),
    transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
])


def train_step(model, optimizer, x, y, device, precision):
    """One plain optimiser step of an nn.Module (the notes' way, and ours without packing)."""
    with autocast(device, precision):
        loss = F.cross_entropy(model(x).float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


class PILDataset(Dataset):
    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.images = x.transpose(0, 2, 3, 1)  # HWC for PIL
        self.labels = y

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return NOTES_FINAL(Image.fromarray(self.images[i])), int(self.labels[i])


def notes_way(x, y, batches: int, batch: int, workers: int) -> float:
    model = LeNet5(100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = DataLoader(PILDataset(x, y), batch_size=batch, shuffle=True, num_workers=workers,
                        drop_last=True)
    cpu = torch.device("cpu")
    done, start = 0, None
    while done < batches + 2:
        for xb, yb in loader:
            if done == 2:  # two warm-up batches, then the clock starts
                start = time.perf_counter()
            train_step(model, opt, xb, yb, cpu, "fp32")
            done += 1
            if done == batches + 2:
                break
    return batches * batch / (time.perf_counter() - start)


def our_way(x_dev, y_dev, batches: int, batch: int, precision: str, augment: bool) -> float:
    device = x_dev.device
    model = LeNet5(100).to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator(device=device).manual_seed(0)
    final = Augment("final")
    aug = (lambda images: final(images, gen)) if augment else prepare_eval
    n = len(y_dev)
    perm = torch.randperm(n, generator=gen, device=device)
    start = None
    for b in range(batches + 2):
        if b == 2:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        idx = perm[(b * batch) % (n - batch):][:batch]
        xb = aug(x_dev[idx]).contiguous(memory_format=torch.channels_last)
        train_step(model, opt, xb, y_dev[idx], device, precision)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batches * batch / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few batches: under a minute")
    p.add_argument("--batches", type=int, help="timed batches per way (default 60, quick 15)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--loader-workers", type=int, default=0,
                   help="DataLoader workers for the notes' way (default 0, DataLoader's own)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--against", metavar="REV", help="also run this at commit REV first; ratios")
    args = p.parse_args()
    if args.against:
        sys.exit(side_by_side(args.against, "throughput.py", sys.argv[1:]))
    batches = args.batches or (15 if args.quick else 60)
    tune_malloc()
    data = make_synthetic(n_train=4096, n_test=1)
    x, y = data.train.x, data.train.y
    device = torch.device(args.device)
    x_dev, y_dev = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    bs = args.batch_size
    print(f"device {device}, torch threads {torch.get_num_threads()}, batch {bs}, "
          f"{batches} timed batches per way, synthetic data (speed only)")
    notes = notes_way(x, y, batches, bs, args.loader_workers)
    print(f"notes' way (PIL transforms, DataLoader workers={args.loader_workers}, eager fp32): "
          f"{notes:8.0f} img/s")
    ours = {}
    for prec in ("fp32", "bf16"):
        ours[prec] = our_way(x_dev, y_dev, batches, bs, prec, augment=True)
        print(f"ours {prec} (batched augmentation on {device.type}, channels_last):"
              f" {ours[prec]:8.0f} img/s")
    model_only = our_way(x_dev, y_dev, batches, bs, "fp32", augment=False)
    print(f"model only fp32 (no augmentation):                    {model_only:8.0f} img/s")
    share = max(0.0, 1 - ours["fp32"] / model_only)
    print(f"speedup_fp32: {ours['fp32'] / notes:.2f} speedup_bf16: {ours['bf16'] / notes:.2f} "
          f"aug_share: {share:.3f}")


if __name__ == "__main__":
    main()
