"""A study on a real (one-node) Slurm cluster (issue 18): `search run --slurm` submits its
workers as one job array; a task signalled the way Slurm preempts stops after its epoch and
requeues itself, and the study still ends with exactly its trials; what cannot work across
nodes is refused in one line before anything is submitted."""

import os
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from search.study.checkpoints import CheckpointStore
from search.study.recovery import chain_root, retried_numbers
from tests.conftest import run_cli

pytestmark = pytest.mark.xdist_group("slurm")  # one Slurm cluster, on one xdist worker

State = optuna.trial.TrialState
SPACE = """
fixed: {{optimizer: sgdm, epochs: {epochs}, dataset: digits, augment: none}}
params:
  lr: {{type: float, low: 1.0e-3, high: 3.0e-2, log: true}}
"""


def _job_states(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True)
    states = {}
    for line in out.stdout.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        states[f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}"] = fields["JobState"]
    return states


def _wait_gone(job: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["squeue", "-h", "-r", "-j", job], capture_output=True, text=True)
        if not out.stdout.strip():
            return
        time.sleep(1)
    subprocess.run(["scancel", job])
    pytest.fail(f"Slurm job {job} did not end in time")


def _job_id(stdout: str) -> str:
    line = next(x for x in stdout.splitlines() if "submitted Slurm job array" in x)
    return line.split("submitted Slurm job array ")[1].split(":")[0]


def _finished(trials):
    retried = retried_numbers(trials)
    return [t for t in trials if t.state.is_finished() and t.number not in retried]


def test_a_study_runs_as_one_job_array(slurm_cluster, postgres, mlflow_server, tmp_path):
    (tmp_path / "s.yaml").write_text(SPACE.format(epochs=3))
    url = postgres.create_database("slurm_array")
    run = run_cli("run", "--space", "s.yaml", "--study", "slurm_array", "--storage", url,
                  "--mlflow-uri", mlflow_server, "--pruner", "none", "--slurm", "--workers", "2",
                  "--pack", "2", "--n-trials", "6", "--slurm-cpus-per-worker", "1",
                  "--slurm-wait", "--checkpoint-every", "1", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-2000:]
    job = _job_id(run.stdout)
    for says in (f"squeue -r -j {job}", f"scancel {job}", "search dashboard --storage",
                 f"checkpoints:  {tmp_path}/checkpoints", "#/experiments/"):
        assert says in run.stdout
    assert _job_states(job) == {f"{job}_0": "COMPLETED", f"{job}_1": "COMPLETED"}
    trials = optuna.load_study(study_name="slurm_array", storage=url).get_trials()
    assert len(trials) == 6 and all(t.state == State.COMPLETE for t in trials)
    assert {t.user_attrs["slurm_task"] for t in trials} == {f"{job}_0", f"{job}_1"}
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("slurm_array")
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if r.data.tags.get("kind") != "study"]
    [parent] = [r for r in runs if r.data.tags.get("kind") == "study"]
    assert sorted(r.data.tags["trial_number"] for r in children) == [str(i) for i in range(6)]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    assert parent.info.status == "FINISHED" and parent.data.tags["slurm_job_id"] == job
    status = run_cli("status", "--storage", url, cwd=tmp_path)
    assert f"Slurm job {job}: no task left" in status.stdout and "Warning" not in status.stderr
    logs = list((tmp_path / "slurm" / "slurm_array" / "logs").glob(f"worker-{job}_*.log"))
    assert len(logs) == 2 and not any("Traceback" in p.read_text() for p in logs)


def test_a_preempted_task_requeues_itself_and_its_trial_resumes(slurm_cluster, postgres,
                                                                 mlflow_server, tmp_path):
    (tmp_path / "s.yaml").write_text(SPACE.format(epochs=10))
    url = postgres.create_database("slurm_preempt")
    run = run_cli("run", "--space", "s.yaml", "--study", "slurm_preempt", "--storage", url,
                  "--mlflow-uri", mlflow_server, "--pruner", "none", "--slurm", "--workers", "2",
                  "--pack", "2", "--n-trials", "6", "--slurm-cpus-per-worker", "1",
                  "--heartbeat", "2", "--stop-within", "0.01", "--checkpoint-every", "1",
                  cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    job = _job_id(run.stdout)
    store = CheckpointStore(tmp_path / "checkpoints", "slurm_preempt")
    study = optuna.load_study(study_name="slurm_preempt", storage=url)
    victim = f"{job}_0"
    deadline = time.time() + 300
    while time.time() < deadline:
        running = [t for t in study.get_trials(states=(State.RUNNING,))
                   if t.user_attrs.get("slurm_task") == victim]
        saved = [store.load(chain_root(t)) for t in running]
        if running and all(s and s["epoch"] >= 2 for s in saved):
            break
        time.sleep(0.5)
    else:
        pytest.fail("task 0 never checkpointed a trial")
    signalled = {t.number for t in running}
    # what Slurm does on preemption or at the time limit: SIGTERM to the task's batch step
    subprocess.run(["scancel", "--signal=TERM", "--batch", victim], check=True)
    _wait_gone(job)
    trials = study.get_trials()
    finished = _finished(trials)
    assert len(finished) == 6 and all(t.state == State.COMPLETE for t in finished)
    roots = [chain_root(t) for t in finished]
    assert len(set(roots)) == 6  # no trial ran twice
    for number in signalled:
        first = next(t for t in trials if t.number == number)
        # --stop-within 0.01: at the next optimiser step inside its epoch (or right after the
        # epoch, when the signal landed in its evaluation)
        reason = first.user_attrs["fail_reason"]
        assert first.state == State.FAIL and ("interrupted in epoch" in reason
                                              or "interrupted after epoch" in reason)
        retry = next(t for t in finished if chain_root(t) == number)
        assert retry.user_attrs["resumed_from_epoch"] >= 2
        assert retry.user_attrs["mlflow_run_id"] == first.user_attrs["mlflow_run_id"]
    log = (tmp_path / "slurm" / "slurm_preempt" / "logs" / f"worker-{victim}.log").read_text()
    assert f"task {victim} requeued" in log and "Traceback" not in log
    assert log.count("search worker: task") == 2  # it ran again after its requeue
    assert set(_job_states(job).values()) == {"COMPLETED"}


@pytest.mark.slow
def test_what_cannot_work_on_a_cluster_is_refused_before_anything_is_submitted(tmp_path):
    (tmp_path / "s.yaml").write_text(SPACE.format(epochs=2))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"  # records any submission
    fake.write_text(f"#!/bin/sh\ntouch {tmp_path}/submitted\necho 1\n")
    fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    journal = run_cli("run", "--space", "s.yaml", "--slurm", "--workers", "2", cwd=tmp_path,
                      env=env)
    assert journal.returncode == 2
    [line] = journal.stderr.strip().splitlines()
    assert "search-journal.log is a file" in line and "postgresql://" in line and "NFS" in line
    local_mlflow = run_cli("run", "--space", "s.yaml", "--slurm", "--storage",
                           "postgresql://u@127.0.0.1:1/db", cwd=tmp_path, env=env)
    assert local_mlflow.returncode == 2 and "--mlflow-uri http://" in local_mlflow.stderr
    assert len(local_mlflow.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "submitted").exists() and not (tmp_path / "slurm").exists()
    assert not (tmp_path / "search-journal.log").exists()
    (tmp_path / "st.yaml").write_text("space: s.yaml\nslurm: {partition: gpu, gpu: 1}\n")
    typo = run_cli("run", "--study", "st.yaml", "--storage", "postgresql://u@127.0.0.1:1/db",
                   cwd=tmp_path, env=env)
    assert typo.returncode == 2 and "slurm: unknown key 'gpu'" in typo.stderr
    no_slurm = run_cli("run", "--space", "s.yaml", "--slurm", "--storage",
                       "postgresql://u@127.0.0.1:1/db", cwd=tmp_path,
                       env={"PATH": str(Path(os.__file__).parent)})
    assert no_slurm.returncode == 2
    [line] = no_slurm.stderr.strip().splitlines()
    assert "`sbatch` is not on PATH" in line


def test_a_pbt_population_is_shared_by_the_tasks_of_a_job_array(slurm_cluster, postgres,
                                                                  mlflow_server, tmp_path):
    """`--pbt --slurm --workers 2`: each task trains half the population; generations meet in
    PostgreSQL, exploits cross tasks through the shared checkpoint folder."""
    (tmp_path / "s.yaml").write_text(SPACE.format(epochs=4) + "  weight_decay: {type: float, "
                                     "low: 1.0e-6, high: 1.0e-3, log: true}\n")
    url = postgres.create_database("slurm_pbt")
    run = run_cli("run", "--space", "s.yaml", "--study", "slurm_pbt", "--storage", url,
                  "--mlflow-uri", mlflow_server, "--slurm", "--workers", "2",
                  "--slurm-cpus-per-worker", "1", "--slurm-wait", "--pbt", "--pbt-population",
                  "4", "--pbt-interval", "2", "--seed", "5", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-2000:]
    trials = optuna.load_study(study_name="slurm_pbt", storage=url).get_trials()
    complete = [t for t in trials if t.state == State.COMPLETE]
    assert sorted(t.user_attrs["pbt_member"] for t in complete) == [0, 1, 2, 3]
    assert all(max(t.intermediate_values) == 4 for t in complete)
    job = _job_id(run.stdout)
    assert {t.user_attrs["slurm_task"] for t in trials} == {f"{job}_0", f"{job}_1"}
    replaced = [t for t in trials if "pbt_replaced_by" in t.user_attrs]
    assert replaced and all(t.state == State.PRUNED for t in replaced)
    assert [t for t in trials if t.user_attrs.get("pbt_parent") is not None]
