"""A throwaway PostgreSQL cluster on loopback (Debian's postgresql package), for the tests
and the soak benchmark: initdb into a temporary folder, pg_ctl start/stop/restart."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return Path(found[-1]).parent
    exe = shutil.which("pg_ctl")
    return Path(exe).parent if exe else None


def _as_postgres(cmd: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; CI runs as root.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


class PostgresServer:
    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="search-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        subprocess.run(_as_postgres([str(bindir / "initdb"), "-D", str(self.data), "-A", "trust",
                                     "-U", "postgres"]), check=True, capture_output=True)
        self.url = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        subprocess.run(_as_postgres([
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-w", "-l", str(self.dir / "log"),
            "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                  "-c max_connections=200", "start"]), check=True, capture_output=True)

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(_as_postgres([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-w",
                                     "-m", mode, "stop"]), capture_output=True)

    def create_database(self, name: str) -> str:
        subprocess.run(_as_postgres([str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p",
                                     str(self.port), "-U", "postgres", name]), check=True,
                       capture_output=True)
        return self.url.rsplit("/", 1)[0] + "/" + name


def serve_until_stopped(stop) -> None:
    """Waits for Ctrl-C or SIGTERM (`kill %1`), then calls `stop()`: a service started from a
    shell for trying things out, tidied up whichever way it is ended."""
    import signal
    import sys
    import time

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop()


if __name__ == "__main__":  # a PostgreSQL to try a study on: prints its URL, Ctrl-C stops it
    import sys

    bindir = pg_bin()
    if bindir is None:
        sys.exit("pg: PostgreSQL binaries not found (apt-get install postgresql)")
    server = PostgresServer(bindir)
    server.start()
    print(server.create_database(sys.argv[1] if len(sys.argv) > 1 else "search"), flush=True)

    def stop() -> None:
        server.stop("fast")
        shutil.rmtree(server.dir, ignore_errors=True)

    serve_until_stopped(stop)
