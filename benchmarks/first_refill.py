"""The first refill of a real `search run` in a study that already holds finished trials: what the
worker spends starting the pack's first trials (ms per trial, the clock of `bookkeeping.py`:
sampling, the trial's row, its MLflow run queued), without and with `--sample-ahead`, side by side.

Each command is the real one (`search.cli.main`, embedded stores, one worker), run in a fresh
process on a fresh copy of the study: a journal file prefilled with `--size` finished trials of
`bookkeeping.py`'s space (lr × weight decay, TPE, median pruner), then `search run --add-trials P
--pack P --epochs 1` on digits (not CIFAR-100; a start does not depend on the data). The modes
alternate, `--repeats` times each; the table gives every run and the medians.

    python benchmarks/first_refill.py [--size 2000] [--pack 64] [--repeats 3]

Last line: `first_refill_ms_per_trial: X (sample ahead: Y, ratio Y/X: R) drawn_ahead: K of P`
(medians).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def one(workdir: Path, pack: int, mode: str) -> dict:
    """In this process: the command on the study in `workdir`, its first refill timed."""
    import optuna

    from benchmarks import bookkeeping
    from search.cli import main
    from search.study.storage import open_storage

    clock = bookkeeping.Clock()
    bookkeeping.instrument_once(clock)
    bookkeeping.CLOCK[0] = clock
    os.chdir(workdir)
    before = len(optuna.load_study(study_name="big", storage=open_storage("search-journal.log")).trials)
    rc = main(["run", "--space", "s.yaml", "--study", "big", "--add-trials", str(pack), "--pack",
               str(pack), "--epochs", "1", "--sample-ahead", mode])
    if rc != 0:
        raise SystemExit(f"search run exited {rc}")
    first_s, first_n = clock.first
    study = optuna.load_study(study_name="big", storage=open_storage("search-journal.log"))
    ran = [t for t in study.get_trials(deepcopy=False) if t.number >= before]
    return {"mode": mode, "first_ms": 1000 * first_s / first_n, "first_trials": first_n,
            "drawn_ahead": sum(bool(t.user_attrs.get("drawn_ahead")) for t in ran[:first_n])}


def prepare(workdir: Path, size: int) -> None:
    """The study as `search run` creates it, then `size` finished trials added."""
    import optuna

    from benchmarks.bookkeeping import SPACE, prefill
    from search.cli import main
    from search.study.storage import open_storage

    (workdir / "s.yaml").write_text(SPACE)
    os.chdir(workdir)
    assert main(["run", "--space", "s.yaml", "--study", "big", "--n-trials", "0"]) == 0
    prefill(optuna.load_study(study_name="big", storage=open_storage("search-journal.log")), size, 3)


def cpu_model() -> str:
    """The CPU's model name where Linux says it, else its architecture."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")),
                platform.machine())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=2000, help="finished trials in the study")
    p.add_argument("--pack", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--one", nargs=2, metavar=("DIR", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--prepare", metavar="DIR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(one(Path(args.one[0]), args.pack, args.one[1])))
        return 0
    if args.prepare:
        prepare(Path(args.prepare), args.size)
        return 0
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True).stdout.strip()
    print(f"first refill: commit {rev}; {platform.node()}: {cpu_model()}, {os.cpu_count()} cores; P {args.pack}, "
          f"study of {args.size} finished trials; python benchmarks/first_refill.py {' '.join(argv or sys.argv[1:])}")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="first-refill-") as tmp:
        seed = Path(tmp) / "seed"
        seed.mkdir()
        subprocess.run([sys.executable, __file__, "--prepare", str(seed), "--size", str(args.size)],
                       check=True, capture_output=True)
        for i in range(args.repeats):
            for mode in ("off", "on"):
                work = Path(tmp) / f"{mode}-{i}"
                work.mkdir()
                for name in ("s.yaml", "search-journal.log", "mlflow.db"):
                    if (seed / name).exists():
                        (work / name).write_bytes((seed / name).read_bytes())
                out = subprocess.run([sys.executable, __file__, "--one", str(work), mode, "--pack",
                                      str(args.pack)], capture_output=True, text=True)
                line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                if out.returncode != 0 or line is None:
                    print(out.stdout[-2000:] + out.stderr[-3000:])
                    return 1
                rows.append(json.loads(line[len("RESULT "):]))
    print("| run | --sample-ahead | first refill, ms per trial | drawn ahead |")
    print("|---|---|---|---|")
    for i, r in enumerate(rows):
        print(f"| {i // 2 + 1} | {r['mode']} | {r['first_ms']:.1f} | {r['drawn_ahead']} of {r['first_trials']} |")
    off = statistics.median(r["first_ms"] for r in rows if r["mode"] == "off")
    on = statistics.median(r["first_ms"] for r in rows if r["mode"] == "on")
    drawn = statistics.median(r["drawn_ahead"] for r in rows if r["mode"] == "on")
    print(f"first_refill_ms_per_trial: {off:.1f} (sample ahead: {on:.1f}, ratio Y/X: {on / off:.2f}) "
          f"drawn_ahead: {drawn:g} of {args.pack}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
