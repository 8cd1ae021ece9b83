"""A benchmark at another commit and here, side by side: `--against REV` of each benchmark.

`worktree(rev)` checks REV out in a temporary git worktree. `side_by_side` runs a benchmark
script as it is at REV and as it is here, with the same arguments, one after the other in
one command, and prints each figure of their last lines (`name: value ...`) with its ratio,
here / REV. Each tree runs its own version of the script, so the figures compare what each
commit's code does with the same work.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIGURE = re.compile(r"([A-Za-z_0-9]+): ([0-9.]+)")


@contextlib.contextmanager
def worktree(rev: str) -> Iterator[Path]:
    """A detached checkout of `rev`, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="against-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=ROOT,
                       check=True, capture_output=True)
        try:
            yield tree
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT,
                           capture_output=True)


def without_against(argv: list[str], rev: str) -> list[str]:
    """The command's arguments less `--against REV` (or `--against=REV`)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--against":
            skip = True
        elif a != f"--against={rev}":
            out.append(a)
    return out


def last_figures(output: str) -> dict[str, float]:
    lines = [line for line in output.splitlines() if FIGURE.search(line)]
    return {k: float(v) for k, v in FIGURE.findall(lines[-1])} if lines else {}


def side_by_side(rev: str, script: str, argv: list[str]) -> int:
    """Run benchmarks/`script` at `rev`, then here; print the ratios of their last lines."""
    rest = without_against(argv, rev)
    figures = {}
    with worktree(rev) as tree:
        for name, where in ((rev, tree), ("this tree", ROOT)):
            print(f"== {name}: python benchmarks/{script} {' '.join(rest)}", flush=True)
            env = {**os.environ, "PYTHONPATH": str(where)}  # its own trainer/ and search/
            r = subprocess.run([sys.executable, str(where / "benchmarks" / script), *rest],
                               cwd=where, env=env, capture_output=True, text=True)
            print(r.stdout + r.stderr, end="", flush=True)
            if r.returncode != 0:
                return r.returncode
            figures[name] = last_figures(r.stdout)
    base, now = figures[rev], figures["this tree"]
    print(f"\n| figure | {rev} | this tree | ratio |\n|---|---|---|---|")
    for key in [k for k in now if k in base]:
        ratio = now[key] / base[key] if base[key] else float("nan")
        print(f"| {key} | {base[key]:g} | {now[key]:g} | {ratio:.3f} |")
    return 0
