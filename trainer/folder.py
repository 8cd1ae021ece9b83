"""Users' own images: `--dataset folder:PATH`, an ImageFolder layout.

    PATH/train/CLASS/*.png|jpg|jpeg      any number of classes (folder names, sorted)
    PATH/test/CLASS/...                  optional: else a fixed stratified 20 % of train

Images are decoded with Pillow (PNG, JPEG), brought to RGB and to 32x32 (torchvision's
antialiased resize), and held as uint8 like CIFAR-100; the validation split is carved from the training set
as for CIFAR-100. A bad layout — no class folders, a class with fewer than two images, an
unreadable file — is a DataError naming the path.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PREFIX = "folder:"
EXTENSIONS = (".png", ".jpg", ".jpeg")


class LayoutError(ValueError):
    """The folder is not an ImageFolder layout this trainer reads; says where."""


def is_folder(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def folder_path(name: str) -> Path:
    return Path(name[len(PREFIX):]).expanduser()


@dataclass(frozen=True)
class Layout:
    classes: tuple[str, ...]
    train: tuple[tuple[Path, int], ...]  # (file, class index)
    test: tuple[tuple[Path, int], ...]  # empty: carved from train


def _files(split: Path, classes: list[str]) -> list[tuple[Path, int]]:
    out = []
    for index, name in enumerate(classes):
        images = sorted(p for p in (split / name).iterdir()
                        if p.is_file() and p.suffix.lower() in EXTENSIONS)
        out += [(p, index) for p in images]
    return out


@functools.lru_cache(maxsize=16)
def scan(path: Path) -> Layout:
    """The layout under `path`, checked (cached: configs ask for sizes often)."""
    train = path / "train"
    if not train.is_dir():
        raise LayoutError(f"{path}: expected {train}/CLASS/*.png|jpg (an ImageFolder layout)")
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise LayoutError(f"{train}: expected a folder per class (at least two), found "
                          f"{len(classes)}")
    files = _files(train, classes)
    counts = np.bincount([c for _, c in files], minlength=len(classes))
    for name, n in zip(classes, counts, strict=True):
        if n < 2:
            raise LayoutError(f"{train / name}: {n} image(s); every class needs at least two "
                              "(.png, .jpg)")
    test: list[tuple[Path, int]] = []
    if (path / "test").is_dir():
        extra = sorted(p.name for p in (path / "test").iterdir()
                       if p.is_dir() and p.name not in classes)
        if extra:
            raise LayoutError(f"{path / 'test' / extra[0]}: a class the training folder lacks")
        present = [c for c in classes if (path / "test" / c).is_dir()]
        test = [(p, classes.index(present[i])) for p, i in _files(path / "test", present)]
    return Layout(tuple(classes), tuple(files), tuple(test))


def sizes(name: str) -> tuple[int, int, int]:
    """(training images, test images, classes) of `folder:PATH`, before the validation split."""
    layout = scan(folder_path(name).resolve())
    if layout.test:
        return len(layout.train), len(layout.test), len(layout.classes)
    n_test = _carved_test_size(len(layout.train), len(layout.classes))
    return len(layout.train) - n_test, n_test, len(layout.classes)


def _carved_test_size(n: int, classes: int) -> int:
    import math

    return max(classes, math.ceil(0.2 * n)) if n - classes >= classes else 0


def _decode(files: tuple[tuple[Path, int], ...]) -> tuple[np.ndarray, np.ndarray]:
    import torch
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    images = []
    for path, _ in files:
        try:
            with Image.open(path) as opened:
                img = F.pil_to_tensor(opened.convert("RGB"))
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise LayoutError(f"{path}: cannot read the image ({reason})") from None
        if img.shape[-2:] != (32, 32):
            img = F.resize(img, [32, 32], antialias=True)
        images.append(img)
    x = torch.stack(images).numpy() if images else np.zeros((0, 3, 32, 32), np.uint8)
    return x, np.asarray([c for _, c in files], dtype=np.int64)


Images = tuple[np.ndarray, np.ndarray]  # (N, 3, 32, 32) uint8 images, int64 labels


def load(name: str) -> tuple[Images, Images, int]:
    """`folder:PATH` as (train, test, classes), uint8 32x32 RGB (`trainer.data` makes it a
    Dataset)."""
    from sklearn.model_selection import train_test_split

    layout = scan(folder_path(name).resolve())
    x, y = _decode(layout.train)
    classes = len(layout.classes)
    if layout.test:
        return (x, y), _decode(layout.test), classes
    n_test = _carved_test_size(len(y), classes)
    if n_test == 0:  # too few images to hold a test set out: a test is then not available
        return (x, y), (x[:0], y[:0]), classes
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=n_test, stratify=y,
                                           random_state=1234)
    return (x[train_idx], y[train_idx]), (x[test_idx], y[test_idx]), classes
