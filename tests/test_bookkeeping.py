"""Bookkeeping off the critical path (issue 28), as users rely on it: checkpoints written in the
background yet there when a retry needs them and never written for an attempt that was lost;
`--checkpoint-every`; one value per epoch per MLflow run whatever resumes from where; and the
benchmark's quick form (its table and last line; no timings asserted)."""

import re
import signal
import subprocess
import sys
import threading
import time

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from search.inputs.values import cadence_value
from search.study.checkpoints import CheckpointStore, due
from tests.conftest import ROOT, run_cli
from trainer.config import CHECKPOINT_FORMAT

State = optuna.trial.TrialState
SPACE = """
fixed: {{optimizer: sgdm, epochs: {epochs}, dataset: digits, augment: none}}
params:
  lr: {{type: float, low: 1.0e-3, high: 3.0e-2, log: true}}
"""


def _state(epoch: int) -> dict:
    return {"format": CHECKPOINT_FORMAT, "epoch": epoch, "step": epoch, "rounds": 0, "history": [],
            "params": torch.zeros(3), "optimizer": {}, "generator": torch.zeros(2)}


def test_the_background_writer_keeps_the_newest_state_and_settles_before_a_retry(tmp_path):
    store = CheckpointStore(tmp_path, "s")
    for epoch in range(1, 6):
        store.submit(0, _state(epoch), attempt=0)
    store.settle(0, 0)
    assert store.load(0)["epoch"] == 5  # whatever was skipped, the newest state is on disk
    store.submit(0, _state(6), attempt=0, still_owned=lambda: False)  # lost meanwhile
    store.drain()
    assert store.load(0)["epoch"] == 5  # a write for a lost attempt never lands
    store.submit(0, _state(7), attempt=4)  # the retry writes its own file
    store.drain()
    store.forget(0, 0)  # the lost attempt's file goes, now that the retry has one
    assert [a for a, _ in store.files(0)] == [4] and store.load(0)["epoch"] == 7
    store.remove(0)
    assert store.files(0) == []


def test_a_trial_end_drops_its_queued_writes(tmp_path):
    store = CheckpointStore(tmp_path, "s")
    gate = threading.Event()
    store.submit(1, _state(1), attempt=1, still_owned=lambda: gate.wait(10) or True)
    store.submit(2, _state(1), attempt=2)  # queued behind the slow one
    time.sleep(0.2)
    threading.Timer(0.5, gate.set).start()
    store.remove(2)  # trial 2 ended before its write: nothing of it may land afterwards
    store.drain()
    assert store.files(2) == [] and store.load(1)["epoch"] == 1


@pytest.mark.slow
def test_checkpoint_every_sets_the_cadence_and_bad_values_are_one_line(cli, tmp_path):
    (tmp_path / "s.yaml").write_text(SPACE.format(epochs=4))
    seen: list[int] = []
    proc = subprocess.Popen(
        [sys.executable, "-m", "search", "run", "--space", "s.yaml", "--n-trials", "1",
         "--pruner", "none", "--checkpoint-every", "2", "--keep-checkpoints"], cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    store = CheckpointStore(tmp_path / "checkpoints", "s")
    while proc.poll() is None:
        if store.path(0).is_file():
            try:
                seen.append(int(store.load(0)["epoch"]))
            except Exception:
                pass
        time.sleep(0.05)
    assert proc.returncode == 0, proc.stderr.read()[-3000:]
    assert set(seen) == {2}  # epochs 1 and 3 are not due; the last epoch never checkpoints
    for bad in ("0", "often", "-5s"):
        r = cli("run", "--space", "s.yaml", "--checkpoint-every", bad)
        assert r.returncode == 2 and "--checkpoint-every" in r.stderr and "Traceback" not in r.stderr


def test_auto_checkpoints_every_epoch_while_cheap_and_at_least_once_a_minute():
    auto = cadence_value("auto")
    assert auto == ("auto", 60.0)
    # 10 ms a checkpoint, 64 trials in flight: at most 2 % of the time is one per 32 s
    assert not due(auto, epochs_since=1, seconds_since=5.0, cost=0.01, in_flight=64)
    assert due(auto, epochs_since=3, seconds_since=33.0, cost=0.01, in_flight=64)
    # alone on a long epoch: every epoch; a costly checkpoint: still once a minute
    assert due(auto, epochs_since=1, seconds_since=2.0, cost=0.01, in_flight=1)
    assert due(auto, epochs_since=1, seconds_since=61.0, cost=10.0, in_flight=64)
    assert not due(auto, epochs_since=0, seconds_since=600.0, cost=0.0, in_flight=1)
    assert due(cadence_value("2"), 2, 0.0, 1.0, 1) and not due(cadence_value("2"), 1, 1e6, 0, 1)
    assert due(cadence_value("5m"), 1, 300.0, 0, 1) and not due(cadence_value("5m"), 9, 299, 0, 1)


@pytest.mark.slow
def test_a_stop_between_epochs_saves_what_the_cadence_had_not(tmp_path):
    """A cadence that has not come round yet (an hour) loses nothing to a SIGTERM: the worker
    finishes its epoch, saves it, and the retry resumes there."""
    (tmp_path / "s.yaml").write_text(SPACE.format(epochs=6))
    cmd = [sys.executable, "-m", "search", "run", "--space", "s.yaml", "--n-trials", "1",
           "--pruner", "none", "--checkpoint-every", "1h", "--stop-within", "600"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    journal = optuna.storages.journal.JournalFileBackend(str(tmp_path / "search-journal.log"))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
            trials = optuna.load_study(study_name="s", storage=optuna.storages.JournalStorage(
                journal)).trials
        except Exception:
            continue
        if trials and len(trials[0].intermediate_values) >= 2:
            break
    store = CheckpointStore(tmp_path / "checkpoints", "s")
    assert store.files(0) == []  # an hour's cadence: nothing written yet
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "Traceback" not in err, err[-3000:]
    saved = store.load(0)
    assert saved is not None and saved["epoch"] >= 2 and "partial" not in saved, err[-2000:]
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    study = optuna.load_study(study_name="s", storage=optuna.storages.JournalStorage(journal))
    [retry] = [t for t in study.trials if t.state == State.COMPLETE]
    assert retry.user_attrs["resumed_from_epoch"] == saved["epoch"]


@pytest.mark.slow
def test_a_restarted_chain_logs_each_epoch_once(tmp_path):
    """A retry that restarts from epoch 0 (its checkpoint unreadable) recomputes epochs its run
    already holds: MLflow keeps one value per epoch, as Optuna keeps the first report."""
    (tmp_path / "s.yaml").write_text(SPACE.format(epochs=8))
    proc = subprocess.Popen([sys.executable, "-m", "search", "run", "--space", "s.yaml",
                             "--n-trials", "1", "--pruner", "none", "--checkpoint-every", "1"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    store = CheckpointStore(tmp_path / "checkpoints", "s")
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if store.load(0)["epoch"] >= 3:
                break
        except Exception:
            pass
        time.sleep(0.1)
    proc.kill()
    proc.communicate()
    store.path(0).write_bytes(b"garbage")
    again = run_cli("run", "--space", "s.yaml", "--n-trials", "1", "--pruner", "none",
                    cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    [run] = [r for r in client.search_runs([client.get_experiment_by_name("s").experiment_id])
             if r.data.tags.get("kind") != "study"]
    for key in ("val_acc", "train_loss"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(1, 9)), (key, steps)


def test_the_quick_benchmark_prints_its_table_and_last_line(postgres):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bookkeeping.py"), "--quick"],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert out.startswith("bookkeeping: digits (not CIFAR-100)") and "commit " in out
    rows = [line for line in out.splitlines() if re.match(r"\| (embedded|server) \| \d+ \|", line)]
    table = rows[len(rows) // 2:]  # the summary table repeats the rows printed as they came
    assert [(r.split("|")[1].strip(), r.split("|")[2].strip(), r.split("|")[3].strip())
            for r in table] == [(s, p, n) for s in ("embedded", "server")
                                for p, n in (("1", "0"), ("4", "0"), ("4", "100"))]
    assert re.fullmatch(r"bookkeeping_ms_per_trial_epoch_p4: [\d.]+ \(server stores: [\d.]+\) "
                        r"start_ms_per_trial: [\d.]+ \(server stores: [\d.]+\)", out.strip().splitlines()[-1])


def test_the_tpe_ask_benchmark_prints_both_samplers_and_its_ratio():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tpe_ask.py"), "--quick"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert re.fullmatch(r"\| 50 \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", lines[-2])
    assert re.fullmatch(r"tpe_ask_ms: [\d.]+ \(optuna: [\d.]+\) ratio: [\d.]+", lines[-1])
