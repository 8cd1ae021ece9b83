"""Your own network: `--model` / the `model` setting names any PyTorch network (a user's file,
a module, torchvision's builders), trained, packed, checkpointed and logged as LeNet-5 is."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.conftest import killed_and_rerun
from trainer import TrainConfig, train
from trainer.engine import Engine
from trainer.runtime import prepare

NETS = textwrap.dedent("""
    from torch import nn


    def bn_net(num_classes, width=8, dropout=0.0):
        return nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
            nn.Linear(width, num_classes))


    def wrong_output(num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes + 1))


    def raises(num_classes):
        raise RuntimeError("no such layer")


    def not_a_module(num_classes):
        return 42
""")


@pytest.fixture
def nets(tmp_path):
    (tmp_path / "nets.py").write_text(NETS)
    return tmp_path / "nets.py"


def _pack(configs, epochs):
    engine = Engine(prepare(configs[0]))
    members = [engine.add(c) for c in configs]
    for _ in range(epochs):
        for _, _, error in engine.run_epoch():
            assert error is None
    return engine, members


def test_a_batchnorm_network_packed_equals_each_trial_alone_and_keeps_its_statistics(nets):
    """Each trial of a pack keeps its own running statistics (in its checkpoint) and evaluates
    on them, and draws its Dropout masks from its own seed: packed, its numbers are its numbers
    alone, bit for bit (on the CPU)."""
    base = dict(dataset="digits", optimizer="sgdm", augment="none", epochs=2, batch_size=128,
                model=f"{nets}:bn_net", model_args={"width": 8, "dropout": 0.3})
    configs = [TrainConfig(**base, lr=0.05, seed=1), TrainConfig(**base, lr=0.01, seed=2)]
    engine, members = _pack(configs, 2)
    for config, member in zip(configs, members, strict=True):
        alone = train(config).history
        assert [h["val_acc"] for h in member.history] == [h["val_acc"] for h in alone]
        assert [h["train_loss"] for h in member.history] == [h["train_loss"] for h in alone]
    a, b = (engine.state(m)["buffers"] for m in members)
    assert set(a) == {"1.running_mean", "1.running_var", "1.num_batches_tracked",
                      "5.running_mean", "5.running_var", "5.num_batches_tracked"}
    assert int(a["1.num_batches_tracked"][0]) == 2 * engine.steps_per_epoch
    assert not torch.equal(a["1.running_mean"], b["1.running_mean"])  # their own statistics
    # a checkpoint resumes in another pack with its statistics
    resumed = Engine(prepare(configs[0]))
    member = resumed.add(configs[0], engine.state(members[0]))
    resumed.run_epoch()  # a third epoch: the engine trains what it is asked
    assert int(resumed.state(member)["buffers"]["1.num_batches_tracked"][0]) == 3 * engine.steps_per_epoch


def test_the_batched_path_updates_each_rows_statistics(nets):
    """The accelerator path (vmap over the rows, forced on the CPU) trains a BatchNorm and
    Dropout network with per-row statistics, as the loop does."""
    base = dict(dataset="digits", optimizer="adamw", augment="none", epochs=1, batch_size=128,
                model=f"{nets}:bn_net", model_args={"width": 8, "dropout": 0.3})
    configs = [TrainConfig(**base, lr=3e-3, seed=1), TrainConfig(**base, lr=1e-3, seed=2)]
    engine = Engine(prepare(configs[0]))
    engine.accelerated = True
    members = [engine.add(c) for c in configs]
    [(_, first, _), (_, second, _)] = engine.run_epoch()
    a, b = (engine.state(m)["buffers"] for m in members)
    assert int(a["5.num_batches_tracked"][0]) == engine.steps_per_epoch
    assert not torch.equal(a["5.running_var"], b["5.running_var"])
    assert first["train_loss"] != second["train_loss"]


def _cli(tmp_path, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "search", *args], cwd=tmp_path, text=True,
                          capture_output=True, timeout=timeout)


@pytest.mark.parametrize("model, args, says", [
    ("nets.py:nope", [], "nets.py has no function 'nope'"),
    ("gone.py:bn_net", [], "no such file"),
    ("nets.py:raises", [], "its factory raised RuntimeError: no such layer"),
    ("nets.py:not_a_module", [], "returned int, not a torch.nn.Module"),
    ("nets.py:wrong_output", [], "returned (2, 11) for a batch of 2 images; expected (2, 10) logits"),
    ("nets.py:bn_net", ["--model-arg", "depth=3"], "model_args.depth: not an argument of"),
    ("torchvision:resnet999", [], "not a torchvision classification model"),
    ("no_such_package.nets:f", [], "cannot import no_such_package.nets"),
])
def test_a_bad_network_is_one_line_before_anything_trains(nets, tmp_path, model, args, says):
    r = _cli(tmp_path, "train", "--dataset", "digits", "--epochs", "1", "--model", model, *args)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_a_bad_network_in_a_space_stops_search_run_before_a_study_exists(nets, tmp_path):
    (tmp_path / "s.yaml").write_text(
        "fixed: {dataset: digits, epochs: 1, model: nets.py:bn_net}\n"
        "params:\n  lr: {type: float, low: 0.001, high: 0.01}\n"
        "  model_args.depth: {type: int, low: 1, high: 3}\n")
    r = _cli(tmp_path, "run", "--space", "s.yaml", "--n-trials", "1")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "model_args.depth: not an argument of" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "search-journal.log").exists()


@pytest.mark.slow
def test_a_searched_network_argument_packs_apart_and_a_logged_model_loads_in_a_fresh_process(
        nets, tmp_path):
    """`model_args.width` searched: each width its own pack; the best trial retrained and its
    model, a class from the user's file, loaded by MLflow in a process without that file."""
    (tmp_path / "s.yaml").write_text(
        "fixed: {dataset: digits, epochs: 2, augment: none, optimizer: sgdm, model: nets.py:bn_net,"
        " model_args.dropout: 0.1}\n"
        "params:\n  lr: {type: float, low: 0.02, high: 0.1, log: true}\n"
        "  model_args.width: {type: categorical, choices: [8, 16]}\n")
    r = _cli(tmp_path, "run", "--space", "s.yaml", "--n-trials", "4", "--pack", "4",
             "--sampler", "random", "--seed", "3", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    import optuna

    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "search-journal.log")))
    study = optuna.load_study(study_name="s", storage=storage)
    trials = study.get_trials()
    assert len(trials) == 4 and {t.params["model_args.width"] for t in trials} == {8, 16}
    r = _cli(tmp_path, "retrain", "--study", "s", "--epochs", "1", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    info = optuna.load_study(study_name="s", storage=storage).user_attrs["retrain"]
    (tmp_path / "nets.py").unlink()  # the fresh process has only what MLflow stored
    load = (f"import mlflow, numpy as np; mlflow.set_tracking_uri('sqlite:///{tmp_path}/mlflow.db');"
            f"m = mlflow.pyfunc.load_model('{info['model_uri']}');"
            "print(np.asarray(m.predict(np.zeros((3, 3, 32, 32), dtype=np.uint8))).shape)")
    out = subprocess.run([sys.executable, "-c", load], cwd="/", capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("(3, 10)"), out.stderr[-3000:]


@pytest.mark.slow
def test_torchvisions_resnet18_trains_through_search_train(tmp_path):
    r = _cli(tmp_path, "train", "--model", "torchvision:resnet18", "--dataset", "digits",
             "--epochs", "1", "--batch-size", "512", "--augment", "none", "--json", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["config"]["model"] == "torchvision:resnet18" and 0 <= out["val_acc"] <= 1


def test_pack_auto_is_sized_from_the_networks_own_memory(nets):
    from search.worker.sizing import auto_pack, network_bytes, trial_bytes

    lenet, resnet = network_bytes(), network_bytes("torchvision:resnet18")
    assert lenet[0] == 815_332 and 0.9e6 < lenet[1] < 1.2e6  # LeNet-5's, as measured by hand
    assert resnet[0] > 10 * lenet[0]
    wide = (("width", 64),)
    assert trial_bytes(64, 1, f"{nets}:bn_net", wide) > trial_bytes(64, 1, f"{nets}:bn_net")
    gib = 2**30
    small = auto_pack("cuda", 256, 1, None, free_bytes=8 * gib, model="torchvision:resnet18")
    assert small.pack < auto_pack("cuda", 256, 1, None, free_bytes=8 * gib).pack
    assert small.pack == int(8 * gib * 0.5 // trial_bytes(256, 1, "torchvision:resnet18"))


@pytest.mark.slow
def test_a_user_network_with_batchnorm_and_dropout_packs_is_killed_and_resumes(nets, tmp_path):
    """`search run --pack 4` on the user's BatchNorm + Dropout network; SIGKILLed mid-trial,
    the rerun resumes each trial from its checkpoint (its running statistics with it)."""
    import optuna

    (tmp_path / "s.yaml").write_text(
        "fixed: {dataset: digits, epochs: 4, augment: none, optimizer: adamw, model: nets.py:bn_net,"
        " model_args.dropout: 0.2, batch_size: 128}\n"
        "params:\n  lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}\n")
    cmd = [sys.executable, "-m", "search", "run", "--space", "s.yaml", "--n-trials", "4",
           "--pack", "4", "--pruner", "none", "--checkpoint-every", "1"]
    states, trials = killed_and_rerun(cmd, tmp_path, range(4), 2)
    assert set(states[0]["buffers"]) >= {"1.running_mean", "1.running_var"}
    retries = [t for t in trials if "failed_trial" in t.system_attrs]
    assert len(retries) == 4
    for retry in retries:
        assert retry.state == optuna.trial.TrialState.COMPLETE
        assert retry.user_attrs["resumed_from_epoch"] >= 2
        assert sorted(retry.intermediate_values) == [1, 2, 3, 4]


@pytest.mark.slow
def test_pbt_evolves_a_user_network(nets, tmp_path):
    (tmp_path / "s.yaml").write_text(
        "fixed: {dataset: digits, epochs: 4, augment: none, optimizer: adamw, model: nets.py:bn_net,"
        " batch_size: 128}\n"
        "params:\n  lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n")
    r = _cli(tmp_path, "run", "--space", "s.yaml", "--pbt", "--pbt-population", "4",
             "--pbt-interval", "2", "--seed", "1", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "replaced, continues as trial" in out and "the best member's schedule" in out, out[-3000:]
