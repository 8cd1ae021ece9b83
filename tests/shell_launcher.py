"""A third launcher, written outside `search/` as a user's package would write it: each worker is
a plain process started through a small shell script, as a remote-shell launcher starts one on
another machine (`ssh HOST sh worker.sh ...`). Registered under the entry-point group
`search.launchers` by tests/test_launcher_plugin.py; nothing in `search/` names it."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from search.launch.base import Launcher, write_spec

SCRIPT = """#!/bin/sh
# one worker of a search study, as a remote shell would start it
export SHELL_TASK_ID="$1" SHELL_TASK_INDEX="$2"
exec "$3" -m search worker --spec "$4"
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


class ShellLauncher(Launcher):
    name, block, task_attr, study_attr = "shell", "shell", "shell_task", "shell_job"

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("shell", "start the --workers through worker.sh")
        g.add_argument("--shell", action="store_true", help="run the workers through worker.sh")

    @classmethod
    def chosen(cls, args, block, where):
        return cls() if args.shell or (block or {}).get("enabled") else None

    def start(self, study, tracker, parent, settings, workers: int):
        folder = Path("shell") / settings.study_name
        spec = write_spec(settings, workers, self.name, folder)
        script = folder / "worker.sh"
        script.write_text(SCRIPT)
        job = str(os.getpid())
        procs = [subprocess.Popen(["sh", str(script), f"{job}_{i}", str(i), sys.executable, str(spec)],
                                  stdout=open(folder / f"worker-{job}_{i}.log", "w"),
                                  stderr=subprocess.STDOUT) for i in range(workers)]
        study.set_user_attr(self.study_attr, {"job": job, "pids": [p.pid for p in procs]})
        print(f"search run: started {workers} workers through {script}", flush=True)
        return procs

    def wait(self, procs) -> None:
        self.codes = [p.wait() for p in procs]

    def ended(self, study, settings, procs) -> int:
        return 0 if not any(self.codes) else 1

    @classmethod
    def task(cls):
        task = os.environ.get("SHELL_TASK_ID")
        return None if task is None else (task, int(os.environ["SHELL_TASK_INDEX"]), None)

    @classmethod
    def others_running(cls, study) -> int:
        pids = (study.user_attrs.get(cls.study_attr) or {}).get("pids", [])
        return sum(_alive(p) for p in pids if p != os.getpid())

    @classmethod
    def status(cls, study):
        job = study.user_attrs.get(cls.study_attr)
        return None if job is None else {"job": job["job"], "running": sum(map(_alive, job["pids"]))}

    @classmethod
    def status_line(cls, fields) -> str:
        return f"shell job {fields['job']}: {fields['running']} worker(s) running"

    @classmethod
    def files(cls, study_name: str) -> list[Path]:
        return [Path("shell") / study_name]
