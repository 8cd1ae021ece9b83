"""`--pack auto` (the default): its sizing rule against a given free device memory, what it
resolves to on the CPU, and a worker that runs out of device memory in a pack: it halves its
pack, the pack's trials resume from their checkpoints, the study finishes (exit 0)."""

import datetime
import textwrap

import optuna
import pytest

from search.worker.sizing import AUTO_CAP, MEMORY_SHARE, auto_pack, trial_bytes

GiB = 2**30
State = optuna.trial.TrialState
SPACE = """
fixed: {optimizer: sgdm, epochs: 3, dataset: digits, augment: none}
params:
  lr: {type: float, low: 1.0e-3, high: 0.1, log: true}
"""


def test_auto_is_one_on_the_cpu_and_sized_by_memory_budget_and_cap_on_a_gpu():
    assert auto_pack("cpu", 64, 1, trials_left=100).pack == 1
    roomy = auto_pack("cuda:0", 64, 1, trials_left=500, free_bytes=139 * GiB)
    assert roomy.pack == AUTO_CAP and "bounded by cap" in roomy.line
    assert "139.0 GiB free" in roomy.line and "batch 64" in roomy.line
    assert auto_pack("cuda", 64, 1, trials_left=5, free_bytes=139 * GiB).pack == 5
    # memory-bound: half the free memory over the estimate, rounded down
    small = auto_pack("cuda", 1024, 1, trials_left=500, free_bytes=8 * GiB)
    assert small.pack == int(8 * GiB * MEMORY_SHARE // trial_bytes(1024)) and "memory" in small.line
    assert 1 < small.pack < AUTO_CAP
    # bigger batches and more local workers per trial hold more, so fewer fit
    assert trial_bytes(1024) > trial_bytes(64) and trial_bytes(64, 8) > trial_bytes(64)
    assert auto_pack("cuda", 64, 8, None, free_bytes=2 * GiB).pack < auto_pack(
        "cuda", 64, 1, None, free_bytes=2 * GiB).pack
    assert auto_pack("cuda", 4096, 1, 10, free_bytes=GiB // 4).pack == 1  # never 0


@pytest.mark.slow
def test_pack_auto_on_the_cpu_runs_one_trial_at_a_time(cli, tmp_path):
    (tmp_path / "s.yaml").write_text(SPACE)
    r = cli("run", "--space", "s.yaml", "--n-trials", "3", "--pack", "auto", "--pruner", "none",
            "--storage", f"sqlite:///{tmp_path}/s.db")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--pack auto" not in r.stderr  # nothing to say where auto is what it always was
    trials = sorted(optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/s.db").trials,
                    key=lambda t: t.datetime_start)
    assert [t.state for t in trials] == [State.COMPLETE] * 3
    for before, after in zip(trials, trials[1:], strict=False):
        assert after.datetime_start >= before.datetime_complete - datetime.timedelta(seconds=1)
    for bad in ("0", "many", "-2"):
        r = cli("run", "--space", "s.yaml", "--pack", bad)
        assert r.returncode == 2 and "--pack" in r.stderr and "Traceback" not in r.stderr


# A device that holds two trials: the engine raises torch's own OutOfMemoryError when it is
# asked to train more than two past their first epoch (so each has a checkpoint to resume).
SMALL_DEVICE = textwrap.dedent("""
    import torch
    from trainer import engine

    _run_epoch = engine.Engine.run_epoch

    def run_epoch(self, stop=None):
        if len(self.members) > 2 and min(m.epoch for m in self.members) >= 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return _run_epoch(self, stop)

    engine.Engine.run_epoch = run_epoch
""")


@pytest.mark.slow
@pytest.mark.parametrize("pack", [4, 1])
def test_a_pack_out_of_device_memory_is_halved_and_its_trials_resume(cli, tmp_path, pack):
    (tmp_path / "s.yaml").write_text(SPACE)
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(SMALL_DEVICE)
    r = cli("run", "--space", "s.yaml", "--n-trials", "4", "--pack", str(pack), "--pruner",
            "none", "--checkpoint-every", "1", "--storage", f"sqlite:///{tmp_path}/s.db",
            env={"PYTHONPATH": str(tmp_path / "inject")})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    trials = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/s.db").trials
    complete = [t for t in trials if t.state == State.COMPLETE]
    assert len(complete) == 4, ([(t.number, t.state.name, t.user_attrs.get("fail_reason"))
                                 for t in trials], r.stderr[-3000:])
    if pack == 1:  # never more than two in flight: nothing to halve
        assert len(trials) == 4 and "out of device memory" not in r.stderr
        return
    assert r.stderr.count("out of device memory with 4 trials in flight: this worker packs at "
                          "most 2 from now on") == 1, r.stderr[-3000:]
    failed = [t for t in trials if t.state == State.FAIL]
    assert len(failed) == 4 and all("out of device memory in a pack of 4 in epoch 2"
                                    in t.user_attrs["fail_reason"] for t in failed)
    retries = [t for t in complete if t.system_attrs.get("failed_trial") is not None]
    assert len(retries) == 4 and all(t.user_attrs["resumed_from_epoch"] == 1 for t in retries)
    assert all(len(t.intermediate_values) == 3 for t in retries)
