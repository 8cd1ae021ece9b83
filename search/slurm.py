"""Slurm: a study's workers as ONE job array, submitted with plain `sbatch --array`.

`search run ... --slurm` creates (or resumes) the study and its parent MLflow run exactly as a
local run does, writes the run's settings to `slurm/STUDY/spec-*.json` under the working
directory (which every node must share, like the checkpoints), and submits an array of
`--workers` tasks; each task is one worker (`search worker --spec FILE`: the same `run_worker`
that local worker processes run), with its `--pack` trials on its GPU or its CPUs.

Why plain sbatch and not submitit: the array task must be a shell script a Slurm user can read
and re-submit by hand (`slurm/STUDY/job.sh`), its requeue on a signal is ours anyway (the worker
stops at a safe point, re-queues its trials in Optuna, then `scontrol requeue`s its own task),
and nothing needs pickling across nodes: the task reads a JSON file of plain settings.

Preemption and time limits: Slurm sends SIGTERM (preemption, `scancel --signal=TERM`, and
`--signal=B:TERM@` before the time limit); the worker stops after the running epoch, its trials
are failed and re-queued from their checkpoints, and the task requeues itself, so it runs again
when the node (or another) is free and runs the rest of its share. A task that dies without a
signal (a node failure) is covered by Optuna's heartbeat: its trials go stale and are retried.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from search.errors import UserError
from search.storage import redact

JOB_ATTR = "slurm_job_id"


@dataclasses.dataclass
class SlurmOptions:
    partition: str | None = None
    time: str | None = None  # HH:MM:SS (or any sbatch --time form)
    gpus_per_worker: int = 0
    cpus_per_worker: int | None = None
    mem: str | None = None
    account: str | None = None
    qos: str | None = None
    extra: list[str] = dataclasses.field(default_factory=list)
    wait: bool = False
    stop_grace: int = 60  # seconds before the time limit that Slurm sends SIGTERM


def task_id() -> str | None:
    """This process's array task (`JOB_TASK`), or None outside a Slurm array."""
    job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{job}_{task}" if job and task else None


def check_can_submit(storage: str, mlflow_uri: str | None) -> None:
    """Refuses what cannot work across nodes, before anything exists: one line each."""
    if shutil.which("sbatch") is None:
        raise UserError("--slurm: `sbatch` is not on PATH; run this on a Slurm login node "
                        "(or load the Slurm module)")
    if "://" not in storage or storage.startswith("sqlite"):
        raise UserError(
            f"--slurm: storage {redact(storage)} is a file; workers on many nodes would share it "
            "through file locks, which corrupt it over NFS. Pass --storage "
            "postgresql://USER@HOST/DB (or grpc://HOST:PORT of `search storage-proxy`)")
    import mlflow

    uri = mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://", "databricks")):
        raise UserError(
            f"--slurm: MLflow tracking URI {uri} is local to this machine (or a file every node "
            "would lock); pass --mlflow-uri http://HOST:PORT of an `mlflow server`")


def _sbatch_lines(opts: SlurmOptions, workers: int, name: str, logs: Path) -> list[str]:
    lines = [f"--job-name=search-{name}", f"--array=0-{workers - 1}",
             f"--output={logs}/worker-%A_%a.log", "--open-mode=append", "--requeue",
             "--ntasks=1", f"--signal=B:TERM@{opts.stop_grace}"]
    if opts.cpus_per_worker:
        lines.append(f"--cpus-per-task={opts.cpus_per_worker}")
    if opts.gpus_per_worker:
        lines.append(f"--gpus-per-task={opts.gpus_per_worker}")
    for flag, value in (("partition", opts.partition), ("time", opts.time), ("mem", opts.mem),
                        ("account", opts.account), ("qos", opts.qos)):
        if value:
            lines.append(f"--{flag}={value}")
    return lines + list(opts.extra)


def job_script(spec_file: Path, workdir: Path, sbatch: list[str]) -> str:
    """The array task: one worker, started in the shared working directory. `exec`: the worker
    is the batch step's process, so Slurm's signals reach it directly."""
    head = "\n".join(f"#SBATCH {line}" for line in sbatch)
    return (f"#!/bin/bash\n{head}\n# one worker of a search study; written by `search run --slurm`\n"
            f"cd {shlex.quote(str(workdir))}\n"
            f"exec {shlex.quote(sys.executable)} -m search worker --spec "
            f"{shlex.quote(str(spec_file))}\n")


def submit(spec, workers: int, opts: SlurmOptions) -> str:
    """Writes the spec and the job script, submits the array; returns the job id."""
    workdir = Path.cwd()
    folder = workdir / "slurm" / spec.study_name
    logs = folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    spec_file = folder / f"spec-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
    spec_file.write_text(json.dumps({"spec": dataclasses.asdict(spec), "workers": workers},
                                    indent=1))
    script = folder / "job.sh"
    script.write_text(job_script(spec_file, workdir,
                                 _sbatch_lines(opts, workers, spec.study_name, logs)))
    out = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if out.returncode != 0:
        why = (out.stderr.strip() or out.stdout.strip()).splitlines()
        raise UserError(f"--slurm: sbatch refused the job ({why[-1] if why else 'no reason'}); "
                        f"the script is {script}")
    return out.stdout.strip().split(";")[0]


def array_tasks(job: str) -> dict[str, int]:
    """States of the array's tasks that Slurm still lists: {state: count}."""
    if shutil.which("squeue") is None:
        return {}
    out = subprocess.run(["squeue", "-h", "-r", "-j", job, "-o", "%T"], capture_output=True,
                         text=True)
    counts: dict[str, int] = {}
    for state in out.stdout.split():
        counts[state.lower()] = counts.get(state.lower(), 0) + 1
    return counts


def requeue_self() -> bool:
    """Asks Slurm to run this array task again (after a signal stopped it mid-share)."""
    task = task_id()
    if task is None or shutil.which("scontrol") is None:
        return False
    out = subprocess.run(["scontrol", "requeue", task], capture_output=True, text=True)
    return out.returncode == 0


def load_spec(path: str) -> tuple[Any, int]:
    from search.study import RunSpec

    try:
        data = json.loads(Path(path).read_text())
        return RunSpec(**data["spec"]), int(data["workers"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--spec {path}: cannot read the worker's settings ({exc})") from None
