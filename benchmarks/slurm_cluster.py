"""A throwaway one-node Slurm cluster on this machine (Debian's slurm-wlm and munge), for the
tests and for trying the README's Slurm section word for word.

munged runs as user munge with its own key and socket, slurmctld and slurmd as root, all state,
spool, logs and the generated slurm.conf under one temporary folder; `env()` gives SLURM_CONF
for the client commands (sbatch, squeue, scancel, scontrol). Needs root.

    python benchmarks/slurm_cluster.py   # starts one, prints `export SLURM_CONF=...`, waits
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONF = """\
ClusterName=search-test
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
AuthInfo=socket={socket}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
SlurmUser=root
SlurmdUser=root
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
JobCompType=jobcomp/none
MpiDefault=none
KillWait=30
MinJobAge=600
JobRequeue=1
InactiveLimit=0
Waittime=0
NodeName={host} CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def available() -> bool:
    return all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch")) \
        and os.geteuid() == 0


class SlurmCluster:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="search-slurm-"))
        self.dir.chmod(0o755)  # munged (user munge) reaches its folder inside
        self.munge = self.dir / "munge"
        self.munge.mkdir(mode=0o700)
        for sub in ("state", "spool"):
            (self.dir / sub).mkdir()
        self.socket = self.munge / "munge.socket"
        self.conf = self.dir / "slurm.conf"
        self.host = socket.gethostname().split(".")[0]
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 - 1024
        self.conf.write_text(CONF.format(
            host=self.host, ctld_port=_free_port(), d_port=_free_port(), socket=self.socket,
            dir=self.dir, cpus=os.cpu_count() or 1, memory=max(1024, memory)))
        self.procs: list[subprocess.Popen] = []

    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 60) -> None:
        key = self.munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        shutil.chown(self.munge, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        subprocess.run(["runuser", "-u", "munge", "--", "munged", "--key-file", str(key),
                        "--socket", str(self.socket), "--pid-file", str(self.munge / "pid"),
                        "--log-file", str(self.munge / "log"), "--seed-file",
                        str(self.munge / "seed"), "--force"], check=True, capture_output=True)
        env = {**os.environ, **self.env()}
        for daemon in (["slurmctld", "-D", "-i"], ["slurmd", "-D"]):
            log = open(self.dir / f"{daemon[0]}.out", "w")
            self.procs.append(subprocess.Popen([*daemon, "-f", str(self.conf)], env=env,
                                               stdout=log, stderr=subprocess.STDOUT))
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True,
                                 text=True)
            if out.returncode == 0 and out.stdout.strip() in ("idle", "mixed", "allocated"):
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the Slurm cluster did not come up; logs in {self.dir}")

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        pid = self.munge / "pid"
        if pid.is_file():
            try:
                os.kill(int(pid.read_text().strip()), 15)
            except (OSError, ValueError):
                pass


if __name__ == "__main__":
    if not available():
        sys.exit("slurm_cluster: needs root and Debian's slurm-wlm and munge")
    cluster = SlurmCluster()
    cluster.start()
    print(f"export SLURM_CONF={cluster.conf}", flush=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.pg import serve_until_stopped

    serve_until_stopped(cluster.stop)
