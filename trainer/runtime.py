"""What every run sets up before its first step: allocator tuning, device, precision, seeds
and the data splits on the device (`prepare`), shared by all trials of a pack."""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass, replace

import torch

from trainer.config import TrainConfig
from trainer.data import DeviceSplit, load_dataset, split_indices, to_device
from trainer.errors import ConfigError

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


def check_device(name: str) -> None:
    """A device asked for by name that this torch cannot use is one line (ConfigError), before
    a study starts, not a CUDA traceback inside its first trial."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: {name!r} is not a torch device; expected auto, cpu, cuda "
                          "or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise ConfigError(
                f"device: {name} asked for, but torch {torch.__version__} sees no CUDA device "
                "(a CPU-only torch build, no NVIDIA driver, or CUDA_VISIBLE_DEVICES "
                f"{'unset' if visible is None else repr(visible)}); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device: {name}: this machine has {torch.cuda.device_count()} "
                              "CUDA device(s)")


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 autocast on CUDA (where supported), fp32 on CPU for faithful numbers."""
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@dataclass
class Setup:
    """Everything built before the first step; shared by every trial of a pack."""

    config: TrainConfig
    device: torch.device
    precision: str
    train: DeviceSplit
    val: DeviceSplit
    test: DeviceSplit
    num_classes: int


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
        train_idx, val_idx = split_indices(data.train.y, config.val_fraction, config.split_seed,
                                           data.groups)
        train, val = to_device(data.train, device, train_idx), to_device(data.train, device, val_idx)
    return Setup(config, device, precision, train, val, to_device(data.test, device),
                 data.num_classes)


# what a Setup is made of besides the shape: packs that agree on these train on the same data
DATA_SETTINGS = ("dataset", "data_root", "val_fraction", "split_seed", "device", "precision")


def prepare_sharing(config: TrainConfig, setups: list[Setup], holdout: str = "val") -> Setup:
    """`prepare(config, holdout)`, or one of `setups` (made with the same holdout) over the same
    data and device with this config: packs of other shapes (batch sizes, augmentations, a PBT
    member's new pack) share one copy of the dataset on the device, loaded and split once."""
    for setup in setups:
        if all(getattr(setup.config, k) == getattr(config, k) for k in DATA_SETTINGS):
            return replace(setup, config=config)
    return prepare(config, holdout)
