"""Datasets by name, held whole as uint8 NCHW tensors on the training device.

`cifar100` reads the official `cifar-100-python/` folder (`search fetch-data`, or the first
`search run` / `search train` on a machine with internet, downloads it with torchvision),
`digits` is scikit-learn's bundled 8x8 digits upscaled to 32x32x3 (real and offline),
`digit-pairs` composes those digits into a harder 100-class colour stand-in (offline, NOT
CIFAR-100), `synthetic` is generated CIFAR-shaped data for benchmarks. The validation split is
carved from the training set, stratified by label, fixed by `split_seed` (for digit-pairs a
whole group of glyphs the training split never sees).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

from trainer.catalogue import CLASSES, DATASETS, TEST_IMAGES, TRAIN_IMAGES, default_data_root
from trainer.errors import DataError
from trainer.folder import LayoutError, is_folder
from trainer.folder import load as load_folder

CIFAR_FOLDER = "cifar-100-python"


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
    groups: np.ndarray | None = None  # per training image: a validation split keeps groups whole


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


def locate_cifar100(root: Path, download: bool = False) -> list[Path]:
    """The official files under `root`; with `download`, fetched by torchvision when absent
    (what `search run` and `search train` do on the user's machine; workers never download:
    a compute node may have no internet). A clear DataError otherwise."""
    folder = Path(root) / CIFAR_FOLDER
    files = [folder / name for name in ("train", "test", "meta")]
    if not all(f.is_file() for f in files) and download:
        try:
            fetch_cifar100(root)
        except DataError as exc:
            raise DataError(f"CIFAR-100 not found at {folder} and {exc}; on a machine with "
                            f"internet run `search fetch-data --data-root {root}` and copy "
                            f"{CIFAR_FOLDER}/ here, or pass --data-root") from None
    missing = [f.name for f in files if not f.is_file()]
    if len(missing) == len(files):
        raise DataError(
            f"CIFAR-100 not found at {folder}; on a machine with internet run `search "
            f"fetch-data --data-root {root}` (or put the official {CIFAR_FOLDER}/ folder there)")
    if missing:
        raise DataError(
            f"CIFAR-100 folder {folder} lacks {', '.join(missing)}; expected the official "
            f"{CIFAR_FOLDER}/ folder with train, test and meta (`search fetch-data` fetches it)"
        )
    return files


def fetch_cifar100(root: Path) -> None:
    """Downloads CIFAR-100 into `root` with torchvision (169 MB) and verifies every file
    against torchvision's checksums; a DataError says what failed."""
    try:
        from torchvision.datasets import CIFAR100

        CIFAR100(str(root), train=True, download=True)
    except Exception as exc:  # offline, disk full, checksum: all end the same way
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"the download failed ({reason})") from None


def verify_cifar100(root: Path) -> str | None:
    """None when the files under `root` match torchvision's checksums, else the first file
    that does not (or is missing)."""
    from torchvision.datasets import CIFAR100
    from torchvision.datasets.utils import check_integrity

    folder = Path(root) / CIFAR_FOLDER
    for name, md5 in [*CIFAR100.train_list, *CIFAR100.test_list, (CIFAR100.meta["filename"],
                                                                   CIFAR100.meta["md5"])]:
        if not check_integrity(str(folder / name), md5):
            return name
    return None


def load_cifar100(root: Path, download: bool = False) -> Dataset:
    files = locate_cifar100(root, download)
    folder = files[0].parent
    try:
        return Dataset(_read_cifar_pickle(files[0]), _read_cifar_pickle(files[1]), CLASSES["cifar100"])
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


PAIRS_TRAIN, PAIRS_TEST, PAIRS_FOLDS = TRAIN_IMAGES["digit-pairs"], TEST_IMAGES["digit-pairs"], 5


def load_digit_pairs() -> Dataset:
    """100 classes "00"-"99": two of scikit-learn's digits side by side in a 32x32 colour image,
    a harder offline stand-in for demos and benchmarks (NOT CIFAR-100).

    The 1,797 glyphs are split, stratified by digit, into a test pool and five training folds;
    each image takes both its glyphs from one pool, and the validation split is one whole fold
    (`groups`), so validation and test images show only glyphs training never saw. Each glyph is
    scaled to 10-18 px, turned up to 20 degrees and placed with a random offset, in darker ink
    of any hue on lighter paper of any hue (some pairs barely differ), with pixel noise (sd 8 %).
    Deterministic. (With ink and paper of unconstrained polarity LeNet-5 sat at chance for
    AdamW lr >= 1e-3; one polarity keeps the task learnable and the lr decisive.)"""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import StratifiedKFold

    digits = load_digits()
    glyphs = torch.from_numpy(digits.images).float().div(16).unsqueeze(1)  # (1797, 1, 8, 8)
    pools = [test for _, test in StratifiedKFold(PAIRS_FOLDS + 1, shuffle=True, random_state=7)
             .split(np.zeros(len(digits.target)), digits.target)]
    rng = np.random.default_rng(2024)

    def compose(pool: np.ndarray, n: int) -> Arrays:
        labels = rng.permutation(np.arange(n) % 100)
        by_digit = [pool[digits.target[pool] == d] for d in range(10)]
        left = np.array([rng.choice(by_digit[c // 10]) for c in labels])
        right = np.array([rng.choice(by_digit[c % 10]) for c in labels])
        mask = torch.maximum(_place(glyphs[left], 8.0, rng), _place(glyphs[right], 24.0, rng))
        g = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
        fg = 0.6 * torch.rand(n, 3, 1, 1, generator=g)  # darker ink on lighter paper, any hue;
        bg = 0.35 + 0.65 * torch.rand(n, 3, 1, 1, generator=g)  # some pairs barely differ
        images = bg + (fg - bg) * mask + 0.08 * torch.randn(n, 3, 32, 32, generator=g)
        return Arrays((images.clamp(0, 1) * 255).round().to(torch.uint8).numpy(),
                      labels.astype(np.int64))

    folds = [compose(pools[f], PAIRS_TRAIN // PAIRS_FOLDS) for f in range(PAIRS_FOLDS)]
    train = Arrays(np.concatenate([f.x for f in folds]), np.concatenate([f.y for f in folds]))
    groups = np.repeat(np.arange(PAIRS_FOLDS), PAIRS_TRAIN // PAIRS_FOLDS)
    return Dataset(train, compose(pools[PAIRS_FOLDS], PAIRS_TEST), 100, groups)


def _place(glyph: torch.Tensor, centre_x: float, rng: np.random.Generator) -> torch.Tensor:
    """Each (1, 8, 8) glyph drawn into a 32x32 canvas around (centre_x, 16): random size, tilt
    and offset (one `grid_sample`); (n, 1, 32, 32) coverage in [0, 1]."""
    n = len(glyph)
    size = torch.from_numpy(rng.uniform(10, 18, n)).float()  # pixels the 8 glyph pixels span
    angle = torch.from_numpy(rng.uniform(-20, 20, n)).float().deg2rad()
    cx = centre_x - 16 + torch.from_numpy(rng.uniform(-3, 3, n)).float()
    cy = torch.from_numpy(rng.uniform(-6, 6, n)).float()
    cos, sin = angle.cos(), angle.sin()
    k = 32 / size  # output normalised units per glyph normalised unit
    # glyph coordinates of an output point p (centred pixels): R^-1 (p - c) / (size / 2)
    theta = torch.stack([torch.stack([k * cos, k * sin, -(cos * cx + sin * cy) * 2 / size], 1),
                         torch.stack([-k * sin, k * cos, (sin * cx - cos * cy) * 2 / size], 1)], 1)
    grid = F.affine_grid(theta, [n, 1, 32, 32], align_corners=False)
    return F.grid_sample(glyph, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def make_synthetic(n_train: int = TRAIN_IMAGES["synthetic"], n_test: int = TEST_IMAGES["synthetic"],
                   classes: int = CLASSES["synthetic"]) -> Dataset:
    """Random CIFAR-shaped images; only for measuring speed, never for accuracy."""
    rng = np.random.default_rng(0)

    def arrays(n: int) -> Arrays:
        x = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        return Arrays(x, rng.integers(0, classes, size=n).astype(np.int64))

    return Dataset(arrays(n_train), arrays(n_test), classes)


def load_dataset(name: str, root: str | Path | None = None) -> Dataset:
    if name == "cifar100":
        return load_cifar100(Path(root) if root else default_data_root())
    if name == "digits":
        return load_digits_32()
    if name == "digit-pairs":
        return load_digit_pairs()
    if name == "synthetic":
        return make_synthetic()
    if is_folder(name):
        try:
            (x, y), (tx, ty), classes = load_folder(name)
        except (LayoutError, OSError) as exc:
            raise DataError(str(exc)) from None
        return Dataset(Arrays(x, y), Arrays(tx, ty), classes)
    raise DataError(f"dataset: unknown {name!r}; expected {', '.join(DATASETS)} or folder:PATH")


def ensure_available(name: str, root: str | Path | None = None) -> None:
    """Checks (and for CIFAR-100 fetches, on the machine the command runs on) a dataset before
    a study starts its first trial."""
    if name == "cifar100":
        locate_cifar100(Path(root) if root else default_data_root(), download=True)
    elif is_folder(name):  # every image decoded once: an unreadable file is found here
        try:
            load_folder(name)
        except (LayoutError, OSError) as exc:
            raise DataError(str(exc)) from None


def split_indices(labels: np.ndarray, val_fraction: float, split_seed: int,
                  groups: np.ndarray | None = None):
    """Stratified (train, val) index arrays; the same seed gives every trial the same split.
    With `groups`, whole groups go to validation (scikit-learn's StratifiedGroupKFold, one fold
    of about `val_fraction`)."""
    if groups is not None:
        from sklearn.model_selection import StratifiedGroupKFold

        folds = max(2, round(1 / val_fraction))
        splitter = StratifiedGroupKFold(folds, shuffle=True, random_state=split_seed)
        return next(splitter.split(np.zeros(len(labels)), labels, groups))
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
