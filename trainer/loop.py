"""The training loop: `train(config, on_epoch)`.

The whole dataset sits on the device as uint8; each step draws a batch by index, augments it
there (per-sample parameters) and runs LeNet-5 in channels_last, under bf16 autocast when asked.
After each epoch the validation split is evaluated and `on_epoch(metrics)` is called; it may
return True to stop, or raise (the search half raises optuna.TrialPruned through here).
"""

from __future__ import annotations

import ctypes
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from trainer.augment import Augment, prepare_eval
from trainer.config import TrainConfig
from trainer.data import DeviceSplit, load_dataset, split_indices, to_device
from trainer.model import LeNet5
from trainer.optim import build_optimizer
from trainer.schedule import lr_at

EpochCallback = Callable[[dict[str, Any]], bool | None]
EVAL_BATCH = 1024


class Diverged(RuntimeError):
    """The training loss became NaN or infinite, or far above the chance loss."""

    def __init__(self, epoch: int, loss: float):
        what = "is not finite" if not math.isfinite(loss) else f"is {loss:.3g}"
        super().__init__(f"diverged at epoch {epoch}: training loss {what}")
        self.epoch, self.loss = epoch, loss


def check_divergence(config: TrainConfig, epoch: int, loss: float, num_classes: int) -> None:
    """Raises Diverged for a non-finite loss or one above diverge_factor x ln(classes)."""
    if not math.isfinite(loss) or loss > config.diverge_factor * math.log(num_classes):
        raise Diverged(epoch, loss)


@dataclass
class TrainResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False
    test_acc: float | None = None

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
                "stopped_early": self.stopped_early, "test_acc": self.test_acc,
                "history": self.history}


_MALLOC_TUNED = False


def tune_malloc() -> None:
    """Keep freed activations in glibc's heap instead of returning them to the OS each step.

    PyTorch's CPU allocator calls malloc/free for every activation; above the default 128 KiB
    mmap threshold each one is a fresh mmap with page faults, ~35 % of a LeNet step here.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, 1 << 30)
        _MALLOC_TUNED = True
    except OSError:  # not glibc (musl, ...): run untuned
        pass


def resolve_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 autocast on CUDA (where supported), fp32 on CPU for faithful numbers."""
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def set_lr(optimizer: torch.optim.Optimizer, config: TrainConfig, epoch: int) -> float:
    """Sets and returns the scheduled lr for 0-based `epoch`."""
    lr = lr_at(config, epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor, device: torch.device, precision: str):
    """One optimiser step on an already augmented batch; returns (loss, logits), detached."""
    with autocast(device, precision):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), logits.detach()


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: DeviceSplit, device: torch.device,
             precision: str) -> tuple[float, float]:
    """(mean loss, accuracy) over a split."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for i in range(0, len(split), EVAL_BATCH):
        x = prepare_eval(split.x[i:i + EVAL_BATCH]).contiguous(memory_format=torch.channels_last)
        y = split.y[i:i + EVAL_BATCH]
        with autocast(device, precision):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    model.train()
    n = max(len(split), 1)
    return loss_sum.item() / n, correct.item() / n


@dataclass
class Setup:
    """Everything built before the first step; shared by the centralised and local loops."""

    config: TrainConfig
    device: torch.device
    precision: str
    train: DeviceSplit
    val: DeviceSplit
    test: DeviceSplit
    num_classes: int
    generator: torch.Generator


def prepare(config: TrainConfig, holdout: str = "val") -> Setup:
    """Seeds, threads, device and data. `holdout="test"` trains on train+val and evaluates on
    the test set (the final evaluation); otherwise the stratified validation split is held out."""
    tune_malloc()
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    data = load_dataset(config.dataset, config.data_root)
    if holdout == "test":
        train = to_device(data.train, device)
        val = to_device(data.test, device)
    else:
        train_idx, val_idx = split_indices(data.train.y, config.val_fraction, config.split_seed)
        train, val = to_device(data.train, device, train_idx), to_device(data.train, device, val_idx)
    gen = torch.Generator(device=device)
    gen.manual_seed(config.seed)
    return Setup(config, device, precision, train, val, to_device(data.test, device),
                 data.num_classes, gen)


CheckpointCallback = Callable[[dict[str, Any]], None]


def train(config: TrainConfig, on_epoch: EpochCallback | None = None, holdout: str = "val",
          resume: dict[str, Any] | None = None,
          on_checkpoint: CheckpointCallback | None = None) -> TrainResult:
    """Trains LeNet-5 as `config` says, calling `on_epoch(metrics)` after every epoch.

    metrics: epoch (1-based), train_loss, train_acc, val_loss, val_acc, lr, seconds, images_per_s.
    After `on_epoch` accepts an epoch, `on_checkpoint(state)` receives everything needed to
    continue from there (model, optimiser, RNG states, epoch, history: tensors and plain data,
    loadable with weights_only=True); `resume=state` continues such a run bit for bit.
    Raises Diverged when the training loss stops being finite or explodes.
    """
    setup = prepare(config, holdout)
    if config.local_workers > 1 or config.local_steps > 1:
        from trainer.local import train_local

        return train_local(setup, on_epoch, resume, on_checkpoint)
    device, precision, gen = setup.device, setup.precision, setup.generator
    model = LeNet5(setup.num_classes).to(device, memory_format=torch.channels_last)
    optimizer = build_optimizer(config, model.parameters(), lr_at(config, 0))
    augment = Augment(config.augment, gen)
    result = TrainResult()
    first = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        gen.set_state(resume["generator"])
        torch.set_rng_state(resume["rng_cpu"])
        result.history = list(resume["history"])
        first = int(resume["epoch"])
    n, bs = len(setup.train), config.batch_size
    for epoch in range(first, config.epochs):
        lr = set_lr(optimizer, config, epoch)
        start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        perm = torch.randperm(n, generator=gen, device=device)
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            x = augment(setup.train.x[idx]).contiguous(memory_format=torch.channels_last)
            y = setup.train.y[idx]
            loss, logits = train_step(model, optimizer, x, y, device, precision)
            loss_sum += loss * len(idx)
            correct += (logits.argmax(1) == y).sum()
        train_loss = loss_sum.item() / n
        check_divergence(config, epoch + 1, train_loss, setup.num_classes)
        seconds = time.perf_counter() - start
        val_loss, val_acc = evaluate(model, setup.val, device, precision)
        metrics = {"epoch": epoch + 1, "train_loss": train_loss, "train_acc": correct.item() / n,
                   "val_loss": val_loss, "val_acc": val_acc, "lr": lr, "seconds": seconds,
                   "images_per_s": n / seconds}
        result.history.append(metrics)
        if on_epoch is not None and on_epoch(metrics):
            result.stopped_early = True
            break
        if on_checkpoint is not None:
            on_checkpoint({"epoch": epoch + 1, "model": model.state_dict(),
                           "optimizer": optimizer.state_dict(), "generator": gen.get_state(),
                           "rng_cpu": torch.get_rng_state(), "history": result.history})
    return result
