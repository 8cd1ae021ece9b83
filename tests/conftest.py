"""Shared fixtures: the `search` CLI as a user runs it, and real servers (PostgreSQL, MLflow)
started on loopback for the tests that need them."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from benchmarks.pg import PostgresServer, pg_bin

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI") == "true"
if "PYTEST_XDIST_WORKER" in os.environ:
    # tests run side by side (`make test`: 4 on 2 cores): each process's torch on one thread,
    # so their OpenMP threads do not spin against each other's (before torch is imported)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


LONG = {"test_faults", "test_search_efficiency", "test_budget", "test_recovery", "test_bookkeeping",
        "test_launcher_plugin"}  # modules of minutes-long tests (each run's durations list them)
SERVICES = {"postgres", "mlflow_server", "slurm_cluster", "tracked_study"}  # what `make test-fast` skips


@pytest.hookimpl(tryfirst=True)  # before xdist's, which reads the groups into node ids
def pytest_collection_modifyitems(config, items):
    """Marks each test that starts a service (PostgreSQL, an MLflow server, a Slurm cluster,
    Chromium) `services` (`make test-fast` runs none of them), and keeps the tests that share a
    module's fixture on one xdist worker (`make test` runs the rest side by side)."""
    for item in items:
        uses = SERVICES & set(getattr(item, "fixturenames", ()))
        if uses or "browser" in item.nodeid or "[postgres]" in item.nodeid:
            item.add_marker(pytest.mark.services)
        if item.get_closest_marker("xdist_group") is None and (group := _xdist_group(item)):
            item.add_marker(pytest.mark.xdist_group(group))
    # the longest first (a worker's chain of grouped tests, minutes-long fault tests), so that
    # none of them starts last and ends the run alone
    items.sort(key=lambda item: not (item.get_closest_marker("xdist_group")
                                     or item.module.__name__ in LONG))


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    """Under `--dist loadgroup`, xdist groups by a suffix it writes into each marked node id
    (pytest 9.2 with xdist 3.8 drops it silently: every module fixture then set up once per
    test, minutes of CI): a lost suffix stops the run here instead."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    lost = [item.nodeid for item in session.items
            if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
    if lost:
        raise pytest.UsageError(f"--dist loadgroup: xdist lost the group of {lost[0]} (and "
                                f"{len(lost) - 1} more); this pytest/pytest-xdist pair cannot group")


def _xdist_group(item) -> str | None:
    """The xdist worker a test must share: a module-scoped fixture's users share one worker (it
    is set up once, not once per worker), and so do the browser tests (one Chromium profile)."""
    if "test_browser" in item.nodeid:
        return "browser"
    defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    for name in sorted(getattr(item, "fixturenames", ())):
        if defs.get(name) and defs[name][-1].scope == "module":
            return f"{item.module.__name__}:{name}"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, cwd: Path | str | None = None, env: dict | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs `search ARGS` in a fresh process, as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "search", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def checkpoints_at(store, numbers, epoch: int, timeout: float = 300) -> list[dict]:
    """Waits until each trial in `numbers` has a checkpoint at `epoch` or later in `store` (a
    CheckpointStore); returns those checkpoints."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        states = [store.load(n) if store.path(n).is_file() else None for n in numbers]
        if all(s is not None and s["epoch"] >= epoch for s in states):
            return states
        time.sleep(0.3)
    pytest.fail(f"no checkpoints of trials {list(numbers)} at epoch {epoch} appeared")


def killed_and_rerun(cmd: list[str], cwd: Path, numbers, epoch: int, study: str = "s"):
    """Starts `cmd` (a `search run` on the journal file in `cwd`), SIGKILLs it once each trial
    in `numbers` has a checkpoint at `epoch` or later, and runs it again to its end; returns
    those checkpoints and the study's trials."""
    import signal

    import optuna

    from search.study.checkpoints import CheckpointStore

    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    states = checkpoints_at(CheckpointStore(Path(cwd) / "checkpoints", study), numbers, epoch)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(Path(cwd) / "search-journal.log")))
    return states, optuna.load_study(study_name=study, storage=storage).get_trials()


@pytest.fixture
def cli(tmp_path):
    """`cli(*args)` runs search in a per-test working directory (embedded storage lands there)."""

    def _run(*args: str, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("cwd", tmp_path)
        return run_cli(*args, **kwargs)

    return _run


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL cluster on loopback (Debian's postgresql package)."""
    bindir = pg_bin()
    if bindir is None:
        if IN_CI:
            pytest.fail("PostgreSQL is not installed; .ci/run installs Debian's postgresql")
        pytest.skip("PostgreSQL binaries not found (apt-get install postgresql)")
    server = PostgresServer(bindir)
    server.start()
    yield server
    server.stop("immediate")
    shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with its own sqlite store and artifact folder."""
    base = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
         "--port", str(port), "--backend-store-uri", f"sqlite:///{base}/mlflow.db",
         "--artifacts-destination", str(base / "artifacts"), "--workers", "1"],
        cwd=base, stdout=open(base / "log", "w"), stderr=subprocess.STDOUT,
        # MLflow 3's server otherwise starts ~8 job-queue processes that poll all the time (for
        # GenAI evaluation jobs, unused here): a few % of a core each on a 2-core machine
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited: {(base / 'log').read_text()[-2000:]}")
    else:
        proc.kill()
        pytest.fail(f"mlflow server did not answer: {(base / 'log').read_text()[-2000:]}")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A one-node Slurm cluster (Debian's slurm-wlm and munge) for this session; its SLURM_CONF
    is set in os.environ while it runs, so commands the tests start reach it."""
    from benchmarks.slurm_cluster import SlurmCluster, available

    if not available():
        if IN_CI:
            pytest.fail("Slurm is not installed; .ci/run installs Debian's slurm-wlm and munge")
        pytest.skip("needs root and Debian's slurm-wlm and munge")
    cluster = SlurmCluster()
    cluster.start()
    os.environ.update(cluster.env())
    yield cluster
    cluster.stop()
    os.environ.pop("SLURM_CONF", None)
    shutil.rmtree(cluster.dir, ignore_errors=True)
