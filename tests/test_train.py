"""The training loop and `search train` as a user runs them."""

import json

import pytest

from tests.test_data import write_fake_cifar100
from trainer import Diverged, TrainConfig, train


def test_train_digits_adamw_reaches_90_percent(cli):
    r = cli("train", "--dataset", "digits", "--optimizer", "adamw", "--lr", "1e-3",
            "--augment", "none", "--epochs", "3", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["epochs"] == 3 and len(out["history"]) == 3
    assert out["val_acc"] >= 0.90
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds",
            "images_per_s"} <= set(out["history"][0])


def test_sgdm_lr_1_diverges_with_one_clear_line(cli):
    r = cli("train", "--dataset", "digits", "--optimizer", "sgdm", "--lr", "1.0",
            "--augment", "none", "--epochs", "5")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert "diverged at epoch" in r.stderr


@pytest.mark.parametrize("command", [
    ["train", "--dataset", "digits", "--epochs", "1"],
    ["run", "--space", "adamw", "--dataset", "digits", "--epochs", "1", "--n-trials", "1"],
])
def test_a_gpu_this_machine_lacks_is_one_line_before_anything_trains(cli, tmp_path, command):
    """`--device cuda` where torch sees no GPU (here: hidden from it): one line naming what
    torch sees, exit 2, no study; not a CUDA traceback inside the first trial."""
    r = cli(*command, "--device", "cuda", env={"CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "device: cuda asked for, but torch" in r.stderr
    assert "CUDA_VISIBLE_DEVICES ''" in r.stderr and "use --device cpu or auto" in r.stderr
    assert not (tmp_path / "search-journal.log").exists()


@pytest.mark.parametrize("flags, needle", [
    (["--lr", "abc"], "--lr"),
    (["--optimizer", "adam"], "--optimizer"),
    (["--batch-size", "0"], "--batch-size"),
    (["--epochs", "-1"], "--epochs"),
    (["--momentum", "1.5"], "momentum"),
])
def test_bad_flags_give_one_line_and_exit_2(cli, flags, needle):
    r = cli("train", "--dataset", "digits", "--epochs", "1", *flags)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0]


def test_missing_cifar_folder_is_one_line(cli, tmp_path):
    r = cli("train", "--dataset", "cifar100", "--data-root", str(tmp_path / "none"),
            "--epochs", "1", env={"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY":
                                  "http://127.0.0.1:9"})
    assert r.returncode == 2
    assert "cifar-100-python" in r.stderr and "Traceback" not in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if "error" in ln]) == 1


def test_trains_on_generated_cifar_format(cli, tmp_path):
    write_fake_cifar100(tmp_path / "data", n_train=1000, n_test=100)
    r = cli("train", "--dataset", "cifar100", "--data-root", str(tmp_path / "data"),
            "--epochs", "1", "--batch-size", "128", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["epochs"] == 1


def test_same_seed_same_numbers_and_callback_stops():
    config = TrainConfig(dataset="digits", epochs=2, augment="final", seed=5)
    a = train(config)
    b = train(config)
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    assert [h["val_acc"] for h in a.history] == [h["val_acc"] for h in b.history]
    seen = []
    c = train(TrainConfig(dataset="digits", epochs=5, augment="none"),
              lambda m: seen.append(m["epoch"]) or m["epoch"] == 2)
    assert seen == [1, 2] and c.stopped_early and c.epochs == 2


def test_diverged_carries_epoch():
    with pytest.raises(Diverged) as err:
        train(TrainConfig(dataset="digits", optimizer="sgdm", lr=5.0, epochs=4, augment="none"))
    assert err.value.epoch >= 1
