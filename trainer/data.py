"""Datasets by name, held whole as uint8 NCHW tensors on the training device.

`cifar100` reads the official `cifar-100-python/` folder (downloading it with torchvision when
absent), `digits` is scikit-learn's bundled 8x8 digits upscaled to 32x32x3 (real and offline),
`synthetic` is generated CIFAR-shaped data for benchmarks. The validation split is carved from
the training set, stratified by label, fixed by `split_seed`.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

CIFAR_FOLDER = "cifar-100-python"


class DataError(RuntimeError):
    """The dataset cannot be had; the message says where it must be put."""


@dataclass
class Arrays:
    """Images (N, 3, 32, 32) uint8 and integer labels, as numpy arrays."""

    x: np.ndarray
    y: np.ndarray


@dataclass
class Dataset:
    train: Arrays
    test: Arrays
    num_classes: int


@dataclass
class DeviceSplit:
    """One split as tensors on the device: uint8 images and int64 labels."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


def _read_cifar_pickle(path: Path) -> Arrays:
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    data = np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return Arrays(data, np.asarray(entry[b"fine_labels"], dtype=np.int64))


def locate_cifar100(root: Path, download: bool = True) -> list[Path]:
    """The official files under `root` (downloaded when absent); a clear DataError otherwise."""
    folder = Path(root) / CIFAR_FOLDER
    files = [folder / name for name in ("train", "test", "meta")]
    if not all(f.is_file() for f in files) and download:
        try:
            from torchvision.datasets import CIFAR100

            CIFAR100(str(root), train=True, download=True)
        except Exception as exc:  # offline, disk full, checksum: all end the same way
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(
                f"CIFAR-100 not found at {folder} and the download failed ({reason}); "
                f"put the official {CIFAR_FOLDER}/ folder (train, test, meta) under {root} "
                "or pass --data-root"
            ) from None
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise DataError(
            f"CIFAR-100 folder {folder} lacks {', '.join(missing)}; expected the official "
            f"{CIFAR_FOLDER}/ folder with train, test and meta"
        )
    return files


def load_cifar100(root: Path, download: bool = True) -> Dataset:
    files = locate_cifar100(root, download)
    folder = files[0].parent
    try:
        return Dataset(_read_cifar_pickle(files[0]), _read_cifar_pickle(files[1]), 100)
    except Exception as exc:
        raise DataError(f"cannot read CIFAR-100 from {folder}: {exc}") from None


def load_digits_32() -> Dataset:
    """scikit-learn's digits, bilinearly upscaled to 32x32, grey copied to 3 channels.

    Digits has no test set: a fixed stratified 20 % is held out as one.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0
    big = torch.nn.functional.interpolate(small, size=32, mode="bilinear", align_corners=False)
    x = (big.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).numpy().copy()
    y = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(y)), test_size=0.2, stratify=y, random_state=1234
    )
    return Dataset(Arrays(x[train_idx], y[train_idx]), Arrays(x[test_idx], y[test_idx]), 10)


def make_synthetic(n_train: int = 10_000, n_test: int = 2_000, classes: int = 100) -> Dataset:
    """Random CIFAR-shaped images; only for measuring speed, never for accuracy."""
    rng = np.random.default_rng(0)

    def arrays(n: int) -> Arrays:
        x = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        return Arrays(x, rng.integers(0, classes, size=n).astype(np.int64))

    return Dataset(arrays(n_train), arrays(n_test), classes)


def load_dataset(name: str, root: str | Path | None = None) -> Dataset:
    from trainer.config import default_data_root

    if name == "cifar100":
        return load_cifar100(Path(root) if root else default_data_root())
    if name == "digits":
        return load_digits_32()
    if name == "synthetic":
        return make_synthetic()
    raise DataError(f"dataset: unknown {name!r}; expected cifar100, digits or synthetic")


def ensure_available(name: str, root: str | Path | None = None) -> None:
    """Checks (and for CIFAR-100 fetches) a dataset before a study starts its first trial."""
    from trainer.config import default_data_root

    if name == "cifar100":
        locate_cifar100(Path(root) if root else default_data_root())


def split_indices(labels: np.ndarray, val_fraction: float, split_seed: int):
    """Stratified (train, val) index arrays; the same seed gives every trial the same split."""
    try:
        return train_test_split(np.arange(len(labels)), test_size=val_fraction,
                                stratify=labels, random_state=split_seed)
    except ValueError as exc:  # too few samples per class for a stratified split
        raise DataError(f"val_fraction {val_fraction}: cannot carve a stratified validation "
                        f"split from {len(labels)} training images ({exc})") from None


def to_device(arrays: Arrays, device: torch.device, index: np.ndarray | None = None) -> DeviceSplit:
    x, y = (arrays.x, arrays.y) if index is None else (arrays.x[index], arrays.y[index])
    return DeviceSplit(torch.from_numpy(np.ascontiguousarray(x)).to(device),
                       torch.from_numpy(np.ascontiguousarray(y)).to(device))
