"""The dataset catalogue: every dataset's name, sizes, classes and source, and where datasets
live on disk, without torch: the command line checks a dataset, and MLflow
records it, without loading one. `trainer.data` loads them; `trainer.folder` reads a
`folder:PATH` dataset."""

from __future__ import annotations

import math
import os
from pathlib import Path

from trainer.errors import ConfigError
from trainer.folder import LayoutError, folder_path, is_folder, sizes

DATASETS = ("cifar100", "digits", "digit-pairs", "synthetic")
IMAGE_SHAPE = (3, 32, 32)  # every dataset's images, a folder's resized to it (trainer.folder)
DATA_ROOT_ENV = "SEARCH_DATA_ROOT"

# images in each dataset's training set (before the validation split is carved from it) and
# in its held-out test set
TRAIN_IMAGES = {"cifar100": 50_000, "digits": 1_437, "digit-pairs": 25_000, "synthetic": 10_000}
TEST_IMAGES = {"cifar100": 10_000, "digits": 360, "digit-pairs": 5_000, "synthetic": 2_000}
CLASSES = {"cifar100": 100, "digits": 10, "digit-pairs": 100, "synthetic": 100}
# where each dataset comes from, as MLflow's dataset source records it: (kind, where)
SOURCES = {"cifar100": ("url", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
           "digits": ("code", "sklearn.datasets.load_digits (8x8 upscaled to 32x32)"),
           "digit-pairs": ("code", "trainer.data.load_digit_pairs (pairs of scikit-learn "
                           "digits in colour, 100 classes; not CIFAR-100)"),
           "synthetic": ("code", "trainer.data.make_synthetic (random images)")}


def dataset_sizes(dataset: str) -> tuple[int, int, int]:
    """(training images before the validation split, test images, classes); a `folder:PATH`
    dataset is scanned (trainer.folder; a bad layout raises ConfigError naming the path)."""
    if is_folder(dataset):
        try:
            return sizes(dataset)
        except (LayoutError, OSError) as exc:
            raise ConfigError(f"dataset: {exc}") from None
    return TRAIN_IMAGES[dataset], TEST_IMAGES[dataset], CLASSES[dataset]


def dataset_source(dataset: str) -> tuple[str, str]:
    """Where a dataset comes from, as MLflow's dataset source records it: (kind, where)."""
    if is_folder(dataset):
        return "local", str(folder_path(dataset).resolve())
    return SOURCES[dataset]


def train_split_size(dataset: str, val_fraction: float) -> int:
    """Images left for training once the validation split (rounded up, as sklearn does) is out."""
    n = dataset_sizes(dataset)[0]
    return n - math.ceil(n * val_fraction)


def default_data_root() -> Path:
    """`$SEARCH_DATA_ROOT`, else `~/.cache/search/data`."""
    env = os.environ.get(DATA_ROOT_ENV)
    return Path(env) if env else Path.home() / ".cache" / "search" / "data"
