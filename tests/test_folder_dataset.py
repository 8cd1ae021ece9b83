"""`--dataset folder:PATH`: the user's own images in an ImageFolder layout (generated PNGs and
JPEGs here) train, pack and report like CIFAR-100, named by their path; a bad layout is one
line naming the path, exit 2, before a study exists."""

import json
import subprocess
import sys

import numpy as np
import optuna
import pytest
from mlflow import MlflowClient
from PIL import Image

from trainer.data import load_dataset as load
from trainer.folder import is_folder

COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]


def write_folder(root, per_class=24, test=True):
    """Three classes of 40x40 images (resized to 32x32 when read): a coloured square on noise,
    PNG and JPEG, in PATH/train/CLASS and PATH/test/CLASS."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 6 if test else 0)):
        for c, colour in enumerate(COLOURS):
            (root / split / f"class{c}").mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 90, (40, 40, 3), dtype=np.uint8)
                x, y = rng.integers(0, 20, 2)
                img[y:y + 20, x:x + 20] = colour
                ext = "jpg" if i % 3 == 0 else "png"
                Image.fromarray(img).save(root / split / f"class{c}" / f"{i}.{ext}")
    return root


def test_a_folder_reads_as_32x32_rgb_with_its_test_split(tmp_path):
    write_folder(tmp_path / "imgs")
    data = load(f"folder:{tmp_path / 'imgs'}")
    assert data.num_classes == 3 and data.train.x.shape == (72, 3, 32, 32)
    assert data.train.x.dtype == np.uint8 and data.test.x.shape == (18, 3, 32, 32)
    assert sorted(np.bincount(data.train.y).tolist()) == [24, 24, 24]
    red = data.train.x[data.train.y == 0][:, 0].mean()
    assert red > data.train.x[data.train.y == 0][:, 2].mean() + 20  # class 0 is the red one
    write_folder(tmp_path / "notest", test=False)  # no test folder: 20 % carved, stratified
    carved = load(f"folder:{tmp_path / 'notest'}")
    assert len(carved.train.y) + len(carved.test.y) == 72 and len(carved.test.y) >= 3
    assert is_folder("folder:/x") and not is_folder("cifar100")


@pytest.fixture
def space(tmp_path):
    (tmp_path / "s.yaml").write_text(
        "name: f\nfixed: {optimizer: adamw, augment: none, epochs: 2, batch_size: 16}\n"
        "params:\n  lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}\n")
    return tmp_path


@pytest.mark.slow
def test_a_study_on_a_folder_trains_packs_and_reports(space):
    folder = write_folder(space / "imgs")
    r = subprocess.run([sys.executable, "-m", "search", "run", "--space", "s.yaml", "--dataset",
                        f"folder:{folder}", "--n-trials", "4", "--pack", "2", "--pruner",
                        "none", "--seed", "0"], cwd=space, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(space / "search-journal.log")))
    study = optuna.load_study(study_name="f", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    values = sorted(t.value for t in study.trials)
    assert values[-1] > 0.5, values  # three colours: well above chance (1/3)
    assert study.user_attrs["dataset"] == f"folder:{folder} (not CIFAR-100)"
    client = MlflowClient(f"sqlite:///{space}/mlflow.db")
    run = client.get_run(study.trials[0].user_attrs["mlflow_run_id"])
    [data] = run.inputs.dataset_inputs
    assert data.dataset.name == f"folder:{folder}" and json.loads(data.dataset.source) == {
        "uri": str(folder)}
    assert json.loads(data.dataset.profile)["classes"] == 3
    r = subprocess.run([sys.executable, "-m", "search", "table", "--study", "f"], cwd=space,
                       capture_output=True, text=True, timeout=300)
    assert f"Measured on folder:{folder}, not CIFAR-100" in r.stdout
    r = subprocess.run([sys.executable, "-m", "search", "report", "--study", "f"], cwd=space,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and (space / "reports" / "f.html").is_file()


@pytest.mark.parametrize("breaks, names", [
    (lambda root: None, "expected {root}/train/CLASS"),
    (lambda root: (root / "train" / "only").mkdir(parents=True), "at least two"),
    (lambda root: (write_folder(root), [p.unlink() for p in
                                        list((root / "train" / "class1").iterdir())[1:]]),
     "class1: 1 image(s)"),
    (lambda root: (write_folder(root), (root / "train" / "class2" / "bad.png").write_bytes(
        b"not a png")), "bad.png: cannot read the image"),
])
@pytest.mark.slow
def test_a_bad_folder_is_one_line(cli, space, breaks, names):
    root = space / "imgs"
    root.mkdir()
    breaks(root)
    r = cli("run", "--space", "s.yaml", "--dataset", f"folder:{root}", "--n-trials", "1")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and names.format(root=root) in lines[0], lines
    assert not (space / "search-journal.log").exists()
