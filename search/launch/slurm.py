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

import argparse
import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from search.errors import EXIT_INTERRUPTED, EXIT_OK, UserError
from search.inputs.settings import RunSettings
from search.inputs.values import positive_int
from search.launch.base import Launcher, WorkersGaveUp, write_spec
from search.logs import redact, say
from search.study.checkpoints import DEFAULT_DIR
from search.study.storage import shared_across_machines

JOB_ATTR = "slurm_job_id"  # the study's (and its parent run's tag): its job array
TASK_ATTR = "slurm_task"  # a trial's: the array task (JOB_TASK) that ran it, over requeues


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
    if not shared_across_machines(storage):
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


def submit(settings: RunSettings, workers: int, opts: SlurmOptions) -> str:
    """Writes the settings file and the job script, submits the array; returns the job id."""
    workdir = Path.cwd()
    folder = workdir / "slurm" / settings.study_name
    logs = folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    spec_file = write_spec(settings, workers, SlurmLauncher.name, folder)
    script = folder / "job.sh"
    script.write_text(job_script(spec_file, workdir,
                                 _sbatch_lines(opts, workers, settings.study_name, logs)))
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


def slurm_options(args: argparse.Namespace, block: dict | None, where: str
                  ) -> SlurmOptions | None:
    """--slurm flags over a study file's `slurm:` block; None when not submitting to Slurm."""
    block = dict(block or {})
    if not (args.slurm or block.get("enabled", bool(block))):
        return None
    fields = {f.name for f in dataclasses.fields(SlurmOptions)}
    unknown = sorted(set(block) - fields - {"enabled"})
    if unknown:
        raise UserError(f"{where}slurm: unknown key {unknown[0]!r}; expected one of "
                        f"{', '.join(sorted(fields - {'wait', 'stop_grace'}))}")
    opts = SlurmOptions(**{k: v for k, v in block.items() if k != "enabled"})
    for name in ("partition", "time", "gpus_per_worker", "cpus_per_worker", "mem", "account",
                 "qos", "wait"):
        value = getattr(args, f"slurm_{name}", None)
        if value not in (None, False):
            setattr(opts, name, value)
    if args.slurm_extra:
        opts.extra = shlex.split(args.slurm_extra)
    if isinstance(opts.extra, str):
        opts.extra = shlex.split(opts.extra)
    if not isinstance(opts.gpus_per_worker, int) or opts.gpus_per_worker < 0:
        raise UserError(f"--slurm-gpus-per-worker: expected an integer >= 0, got "
                        f"{opts.gpus_per_worker!r}")
    return opts


class SlurmLauncher(Launcher):
    """`search run --slurm`: the workers are the tasks of one Slurm job array."""

    name, block, task_attr, study_attr = "slurm", "slurm", TASK_ATTR, JOB_ATTR
    trains_here = False  # a login node need not have the compute nodes' GPUs

    def __init__(self, opts: SlurmOptions):
        self.opts = opts

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser) -> None:
        slurm_flags(parser)

    @classmethod
    def chosen(cls, args: argparse.Namespace, block: dict | None, where: str) -> SlurmLauncher | None:
        opts = slurm_options(args, block, where)
        return None if opts is None else cls(opts)

    def check(self, settings: RunSettings) -> None:
        check_can_submit(settings.storage, settings.mlflow_uri)

    def prepare(self, settings: RunSettings, workers: int) -> RunSettings:
        # a relative folder means the submitting directory's, which every node must share
        return dataclasses.replace(settings, checkpoint_dir=str(
            (Path.cwd() / (settings.checkpoint_dir or DEFAULT_DIR)).absolute()))

    def start(self, study, tracker, parent: str, settings: RunSettings, workers: int) -> str:
        """ONE job array of `workers` tasks; prints how to follow it. Returns its job id."""
        opts = self.opts
        job = submit(settings, workers, opts)
        study.set_user_attr(JOB_ATTR, job)
        tracker.tag(parent, JOB_ATTR, job)
        storage = redact(settings.storage)
        where = "on its GPU" if opts.gpus_per_worker else "on its CPUs"
        flight = (f"up to {settings.pack} trial(s) in flight" if settings.pack != "auto"
                  else "as many trials in flight as its GPU holds (--pack auto)"
                  if opts.gpus_per_worker else "one trial at a time (--pack auto on CPUs)")
        lines = [f"submitted Slurm job array {job}: {workers} tasks, each one worker with "
                 f"{flight} {where}",
                 f"follow it:    squeue -r -j {job}    (or: search status --storage '{storage}')",
                 f"cancel it:    scancel {job}",
                 f"worker logs:  slurm/{settings.study_name}/logs/worker-{job}_*.log",
                 f"checkpoints:  {settings.checkpoint_dir} (every node must share this folder)",
                 f"dashboard:    search dashboard --storage '{storage}'"]
        if tracker.run_url():
            lines.append(f"MLflow:       {tracker.run_url(parent)}")
        for line in lines:
            print(f"search run: {line}", flush=True)
        return job

    def follows(self, job: str) -> bool:
        return self.opts.wait  # --slurm-wait: the same progress lines until the array ends

    def wait(self, job: str) -> None:
        while array_tasks(job):
            time.sleep(2.0)

    def interrupted(self, job: str) -> int:
        subprocess.run(["scancel", job], capture_output=True)
        say(f"cancelled Slurm job array {job}; its trials resume from their "
            "checkpoints with the next command on the study", "search run")
        return EXIT_INTERRUPTED

    def ended(self, study, settings: RunSettings, job: str) -> int:
        from search.worker.run import finished_by

        done = finished_by(study)
        print(f"search run: Slurm job array {job} ended; the study has {done} finished trials",
              flush=True)
        total = settings.study_total
        if total is not None and done < total:
            raise WorkersGaveUp(f"{total - done} of the study's {total} trials did not run; "
                                f"see slurm/{settings.study_name}/logs/worker-{job}_*.log")
        return EXIT_OK

    @classmethod
    def task(cls) -> tuple[str, int, int | None] | None:
        task = task_id()
        if task is None:
            return None
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        return task, int(os.environ.get("SLURM_ARRAY_TASK_ID", "0")), int(cpus) if cpus else None

    @classmethod
    def requeue(cls) -> bool:
        return requeue_self()

    @classmethod
    def others_running(cls, study) -> int:
        job = os.environ.get("SLURM_ARRAY_JOB_ID")
        return sum(array_tasks(job).values()) - 1 if job else 0

    @classmethod
    def status(cls, study) -> dict | None:
        job = study.user_attrs.get(JOB_ATTR)
        return None if job is None else {"job": job, "tasks": array_tasks(job)}

    @classmethod
    def status_line(cls, fields: dict) -> str:
        return f"Slurm job {fields['job']}: " + (", ".join(
            f"{n} {state}" for state, n in sorted(fields["tasks"].items())) or "no task left")

    @classmethod
    def files(cls, study_name: str) -> list[Path]:
        return [Path("slurm") / study_name]


def slurm_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Slurm", "submit the --workers as one Slurm job array and return "
                             "(needs a database --storage and an MLflow server every node reaches)")
    g.add_argument("--slurm", action="store_true", help="run the workers as Slurm array tasks")
    g.add_argument("--slurm-partition", help="sbatch --partition")
    g.add_argument("--slurm-time", help="sbatch --time per task, e.g. 04:00:00; SIGTERM comes "
                   "60 s before it and the task requeues itself")
    g.add_argument("--slurm-gpus-per-worker", type=int, default=None,
                   help="GPUs per array task (default 0: CPUs only; 1 on a GPU partition)")
    g.add_argument("--slurm-cpus-per-worker", type=positive_int, help="sbatch --cpus-per-task")
    g.add_argument("--slurm-mem", help="sbatch --mem per task, e.g. 16G")
    g.add_argument("--slurm-account", help="sbatch --account")
    g.add_argument("--slurm-qos", help="sbatch --qos")
    g.add_argument("--slurm-extra", help='more sbatch options, e.g. "--constraint=a100"')
    g.add_argument("--slurm-wait", action="store_true", help="follow the study until the array "
                   "ends (Ctrl-C cancels the array)")
