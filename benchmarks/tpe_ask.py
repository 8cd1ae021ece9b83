"""What one TPE ask costs as a study grows, Optuna's own sampler against ours, side by side.

Our TPE (`search.inputs.algorithms.make_sampler("tpe", ...)`) is Optuna's TPESampler
(multivariate, group, constant liar) with its group decomposition fed each finished trial once
(`optuna_seam.group_space_once_per_trial`) instead of every trial at every ask. Both sample the
same values (tests/test_optuna_seam.py); this prints what each ask costs, in one process, on two
in-memory studies that hold the same N finished trials of the bookkeeping benchmark's space:

    python benchmarks/tpe_ask.py [--sizes 500,2000] [--asks 20]
    python benchmarks/tpe_ask.py --quick   # sizes 50, 3 asks

Last line: `tpe_ask_ms: X (optuna: Y) ratio: R` at the largest size.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def ms_per_ask(sampler, size: int, asks: int) -> float:
    import optuna

    from benchmarks.bookkeeping import prefill

    study = optuna.create_study(direction="maximize", sampler=sampler)
    prefill(study, size, 3)
    start = time.perf_counter()
    for _ in range(asks):  # each stays running, as a pack's trials do (the constant liar sees them)
        trial = study.ask()
        trial.suggest_float("lr", 1e-4, 1e-2, log=True)
        trial.suggest_float("weight_decay", 1e-6, 1e-3, log=True)
    return 1000 * (time.perf_counter() - start) / asks


def main() -> None:
    import optuna

    from benchmarks.bookkeeping import SPACE
    from search.inputs.algorithms import make_sampler
    from search.inputs.space import parse_space

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="500,2000")
    parser.add_argument("--asks", type=int, default=20)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    sizes = [50] if args.quick else [int(s) for s in args.sizes.split(",")]
    asks = 3 if args.quick else args.asks
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)

    space = parse_space(SPACE, "tpe_ask.yaml")

    def tpe():  # Optuna's own, with make_sampler's settings
        return optuna.samplers.TPESampler(seed=0, constant_liar=True, multivariate=True, group=True)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip() or "-"
    print(f"tpe_ask: ms per ask, {asks} asks per size; commit {commit}; {platform.node()}, "
          f"python {' '.join(sys.argv[1:])}")
    print("| study holds | optuna | ours | ratio |\n|---|---|---|---|")
    for size in sizes:
        theirs = ms_per_ask(tpe(), size, asks)
        ours = ms_per_ask(make_sampler("tpe", space, 0), size, asks)  # what `search run` uses
        print(f"| {size} | {theirs:.1f} | {ours:.1f} | {ours / theirs:.3f} |")
    print(f"tpe_ask_ms: {ours:.1f} (optuna: {theirs:.1f}) ratio: {ours / theirs:.3f}")


if __name__ == "__main__":
    main()
