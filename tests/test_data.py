"""Datasets: the CIFAR-100 reader on files generated in the official on-disk format, a clear
error when the folder is missing, the stratified fixed validation split, digits."""

import pickle

import numpy as np
import pytest

from trainer.data import DataError, load_cifar100, load_dataset, split_indices


def write_fake_cifar100(root, n_train=500, n_test=100, seed=0):
    """Generated data in the official cifar-100-python/ layout (NOT real CIFAR-100)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = rng.permutation(np.arange(n) % 100).tolist()
        entry = {b"filenames": [f"{i}.png".encode() for i in range(n)], b"batch_label": name.encode(),
                 b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine],
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"s{i}".encode() for i in range(20)]}, f)
    return folder


def test_reads_official_format(tmp_path):
    folder = write_fake_cifar100(tmp_path)
    data = load_cifar100(tmp_path, download=False)
    assert data.num_classes == 100
    assert data.train.x.shape == (500, 3, 32, 32) and data.train.x.dtype == np.uint8
    assert data.test.x.shape == (100, 3, 32, 32)
    with open(folder / "train", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    # rows are 1024 red, then green, then blue values, row-major: channel-first after reshape
    np.testing.assert_array_equal(data.train.x[3, 1].reshape(-1), raw[b"data"][3][1024:2048])
    assert data.train.y.tolist() == raw[b"fine_labels"]


def test_missing_folder_says_where_to_put_it(tmp_path):
    with pytest.raises(DataError) as err:
        load_cifar100(tmp_path / "nowhere", download=False)
    msg = str(err.value)
    assert "cifar-100-python" in msg and str(tmp_path / "nowhere") in msg and "\n" not in msg


def test_validation_split_is_stratified_and_fixed():
    labels = np.repeat(np.arange(10), 50)
    train_a, val_a = split_indices(labels, 0.2, split_seed=3)
    train_b, val_b = split_indices(labels, 0.2, split_seed=3)
    np.testing.assert_array_equal(val_a, val_b)
    assert len(val_a) == 100 and not set(train_a) & set(val_a)
    assert np.bincount(labels[val_a]).tolist() == [10] * 10
    _, val_c = split_indices(labels, 0.2, split_seed=4)
    assert set(val_c) != set(val_a)


def test_digits_are_real_32x32_rgb():
    data = load_dataset("digits")
    assert data.num_classes == 10
    assert data.train.x.shape[1:] == (3, 32, 32) and data.train.x.dtype == np.uint8
    assert len(data.train.y) + len(data.test.y) == 1797
    assert data.train.x.max() > 200  # strokes reach near-white after upscaling


@pytest.mark.slow
def test_digit_pairs_is_a_deterministic_100_class_stand_in_with_held_out_glyphs():
    from search.tracking.datasets import dataset_input
    from trainer.catalogue import TEST_IMAGES, TRAIN_IMAGES, train_split_size
    from trainer.config import TrainConfig

    a, b = load_dataset("digit-pairs"), load_dataset("digit-pairs")
    assert a.num_classes == 100 and a.train.x.shape == (TRAIN_IMAGES["digit-pairs"], 3, 32, 32)
    assert len(a.test.y) == TEST_IMAGES["digit-pairs"]
    np.testing.assert_array_equal(a.train.x, b.train.x)  # the same images every time
    assert np.bincount(a.train.y, minlength=100).tolist() == [250] * 100  # balanced
    assert len({tuple(img) for img in a.train.x[:, 0, 16, ::4]}) > 24_000  # not repeats
    # validation is one whole group of glyphs (folds of the 1,797 originals), of the size
    # the batch-size checks assume
    train, val = split_indices(a.train.y, 0.2, 0, a.groups)
    assert len(set(a.groups[val])) == 1 and not set(a.groups[val]) & set(a.groups[train])
    assert len(train) == train_split_size("digit-pairs", 0.2)
    # colour images: the channels differ
    assert np.abs(a.train.x[:, 0].astype(int) - a.train.x[:, 1]).mean() > 20
    shown = dataset_input(TrainConfig(dataset="digit-pairs").to_dict()).dataset
    assert shown.name == "digit-pairs" and "not CIFAR-100" in shown.source
