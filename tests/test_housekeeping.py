"""The commands around a study: `search fetch-data` (CIFAR-100 fetched once and verified with
torchvision's checksums, for clusters whose nodes have no internet; workers never download and
name that command), and `search clean` (a study's checkpoints, report and Slurm files listed
with sizes, removed only with --yes, never while its trials can still resume from them). On
data generated in CIFAR-100's on-disk format, not CIFAR-100."""

import hashlib

import optuna
import pytest
from test_data import write_fake_cifar100
from torchvision.datasets import CIFAR100

from search.cli import main
from trainer.data import DataError, load_cifar100


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_fetch_data_verifies_what_is_there_and_never_overwrites_it(tmp_path, capsys, monkeypatch):
    folder = write_fake_cifar100(tmp_path)
    assert main(["fetch-data", "--data-root", str(tmp_path)]) == 2  # not the official files
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{folder / 'train'}: missing or not the official" in err
    # the same files, were they the official ones: torchvision's checksums say they are
    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5(folder / "train")]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5(folder / "test")]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": md5(folder / "meta")})
    assert main(["fetch-data", "--data-root", str(tmp_path)]) == 0
    assert "present, verified against torchvision's checksums" in capsys.readouterr().out
    (folder / "meta").write_bytes(b"truncated")
    assert main(["fetch-data", "--data-root", str(tmp_path)]) == 2
    assert f"{folder / 'meta'}: missing or not the official" in capsys.readouterr().err
    assert (folder / "meta").read_bytes() == b"truncated"  # left for the user to look at


def test_a_failed_download_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(CIFAR100, "url", "http://127.0.0.1:9/cifar-100-python.tar.gz")
    assert main(["fetch-data", "--data-root", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "the download failed" in err and "run this where" in err


def test_a_worker_without_data_names_the_fetch_command_instead_of_downloading(tmp_path,
                                                                              monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("a worker must not download")

    monkeypatch.setattr(CIFAR100, "download", no_download)
    with pytest.raises(DataError) as err:
        load_cifar100(tmp_path / "empty")  # what a worker's trainer calls
    assert f"search fetch-data --data-root {tmp_path / 'empty'}" in str(err.value)


def test_clean_lists_then_removes_a_studys_files_but_never_its_results(tmp_path, capsys,
                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints" / "s").mkdir(parents=True)
    (tmp_path / "checkpoints" / "s" / "trial-0.pt").write_bytes(b"x" * 2_000_000)
    (tmp_path / "checkpoints" / "other").mkdir()
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "s.html").write_text("<html></html>")
    (tmp_path / "slurm" / "s").mkdir(parents=True)
    (tmp_path / "slurm" / "s" / "job.sh").write_text("#!/bin/sh\n")
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "search-journal.log")))
    study = optuna.create_study(study_name="s", storage=storage)
    running = study.ask()

    assert main(["clean", "--study", "s"]) == 0
    out = capsys.readouterr().out
    assert "2.0 MB  checkpoints/s/" in out and "reports/s.html" in out and "slurm/s/" in out
    assert "--yes` removes them" in out and (tmp_path / "checkpoints" / "s").exists()

    assert main(["clean", "--study", "s", "--yes"]) == 2  # a trial resumes from them
    assert "1 trial(s) still running or waiting" in capsys.readouterr().err
    study.tell(running, 1.0)
    assert main(["clean", "--study", "s", "--yes"]) == 0
    assert "removed 2.0 MB" in capsys.readouterr().out
    assert not (tmp_path / "checkpoints" / "s").exists() and not (tmp_path / "slurm" / "s").exists()
    assert not (tmp_path / "reports" / "s.html").exists()
    assert (tmp_path / "checkpoints" / "other").exists()  # another study's: untouched
    assert (tmp_path / "search-journal.log").exists()  # the results stay
    assert main(["clean", "--study", "s"]) == 0
    assert "nothing to remove" in capsys.readouterr().out
