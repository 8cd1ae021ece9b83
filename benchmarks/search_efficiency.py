"""Does the search pay? Samplers and pruners against the notes' grid, at equal compute.

For each strategy, R independent studies (seeds 0..R-1, each its own in-memory storage) run
until the epochs they actually trained reach the budget (a pruned trial costs the epochs it
ran, so pruning is credited; the last trial may overshoot by less than one trial). A trial's
value counts when it completes; the best value so far is recorded against epochs spent.

Strategies: tpe-hyperband (TPE + Hyperband), tpe-median (TPE + median pruner), random (no
pruning), gp (Optuna's GPSampler, when the space has a continuous parameter), cmaes (only when
every parameter is numeric) and grid: the study file's fixed trials (the notes' table), in
order, unpruned, until the budget or the rows run out.

    python benchmarks/search_efficiency.py [--study seed-adamw] [--space SPACE] [--budget 48]
        [--repeats 3] [--dataset digits] [--epochs 2] [--strategies tpe-hyperband,random,grid]
        [--target 0.80] [--jobs 2] [--plot benchmarks/out/search_efficiency.png] [--json OUT]

Prints one table (best val accuracy, mean ± sd over repeats, at 25 %, 50 % and 100 % of the
budget; epochs to reach the target; trials run and pruned) and, last,
`tpe_hyperband_vs_random: +X.X points at equal budget, grid: Y.Y` (Y.Y: the grid's best, %).
A difference smaller than the spread across repeats is reported as no difference.

Many trials in flight: `--in-flight 1,16,64` runs each strategy's studies with W trials in
flight through the worker loop users run (`search.worker.loop.run_trials`, `--pack W`), with the
default `--ramp` unless the strategy says `+rampN` or `+rampoff` (e.g. `tpe-hyperband+rampoff`);
the table adds rounds to the target (a launch-bound GPU's time) and the last line is
`epochs_to_target_ratio_pW_vs_p1: X (random: Y)`. `--quick` (CI: widths 1 and 8, a 16-epoch
budget); `--first-seed` and `--json` to add repeats later, `--tabulate A.json,B.json` to print
them together (what they trained on is read from the files).

The harder stand-in: `--study digit-pairs-adamw --dataset digit-pairs --epochs 3 --target 0.50`
(the notes' AdamW space on digit-pairs, not CIFAR-100; ~10 s a trial-epoch on a 2-core CPU, so
wide tables there are a GPU's job). digits stays the default: it runs in minutes on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STRATEGIES = {  # name -> (sampler, pruner)
    "tpe-hyperband": ("tpe", "hyperband"),
    "tpe-median": ("tpe", "median"),
    "tpe": ("tpe", "none"),
    "random": ("random", "none"),
    "gp": ("gp", "none"),
    "cmaes": ("cmaes", "none"),
    "grid": (None, "none"),
    "pbt": ("random", "none"),  # population-based training: P members of budget/P epochs
    "pbt-noexploit": ("random", "none"),  # the same population, never copied: PBT's baseline
}


def run_study(strategy: str, seed: int, space_text: str, space_path: str, fixed: list[dict],
              overrides: dict, budget: int, population: int = 4, workdir: str = ".") -> dict:
    """One study of one strategy; returns its curve [(epochs spent, value)] of completed trials
    and its counts. Runs in a worker process (one torch thread)."""
    import optuna
    import torch

    if strategy.startswith("pbt"):
        return run_pbt(strategy, seed, space_text, space_path, overrides, budget, population,
                       workdir)

    from search.inputs.algorithms import make_pruner, make_sampler
    from search.inputs.space import parse_space
    from trainer import Diverged, TrainConfig, train

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    space = parse_space(space_text, space_path)
    epochs = int(overrides.get("epochs", space.fixed.get("epochs", TrainConfig.epochs)))
    sampler_name, pruner_name = STRATEGIES[strategy]
    sampler = (optuna.samplers.RandomSampler(seed=seed) if sampler_name is None
               else make_sampler(sampler_name, space, seed))
    # few trials fit a short budget: let the median pruner start after 3
    study = optuna.create_study(direction="maximize", sampler=sampler,
                                pruner=make_pruner(pruner_name, epochs, startup_trials=3))
    for row in fixed if strategy == "grid" else ():
        study.enqueue_trial(row["params"])
    spent, curve, pruned = 0, [], 0

    def objective(trial: optuna.Trial) -> float:
        nonlocal spent

        def on_epoch(m: dict) -> None:
            nonlocal spent
            spent += 1
            trial.report(m["val_acc"], m["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned()

        config = TrainConfig.from_dict({**space.sample(trial), **overrides, "seed": seed})
        try:
            value = train(config, on_epoch).val_acc
        except Diverged:
            raise optuna.TrialPruned() from None  # a diverged trial: its epochs are spent
        curve.append((spent, value))
        return value

    def stop(study: optuna.Study, trial) -> None:
        nonlocal pruned
        pruned += trial.state == optuna.trial.TrialState.PRUNED
        if spent >= budget:
            study.stop()

    n_trials = len(fixed) if strategy == "grid" else None
    study.optimize(objective, n_trials=n_trials, callbacks=[stop])
    ran = [t for t in study.trials if t.state.is_finished()]  # not the grid rows left queued
    return {"strategy": strategy, "seed": seed, "curve": curve, "spent": spent,
            "trials": len(ran), "pruned": pruned, "epochs_per_trial": epochs,
            "trial_epochs": [len(t.intermediate_values) for t in ran]}


def run_pbt(strategy: str, seed: int, space_text: str, space_path: str, overrides: dict,
            budget: int, population: int, workdir: str) -> dict:
    """PBT at the same budget: `population` members of budget / population epochs each, one
    pack, an exploit step every quarter of a member's epochs (`pbt-noexploit`: the same members,
    from the same seeds, never copied). Values count at the end, when the members complete. The
    space's searched shape settings (batch size, augmentation) are fixed to the trainer's
    defaults for the population, so that its members can copy each other."""
    import optuna
    import torch

    from search.inputs.pbt import Pbt, mutable_names
    from search.inputs.space import parse_space
    from search.logs import quiet_libraries
    from search.study.recovery import RetryDeadTrial
    from search.study.session import TrialRunner
    from search.tracking.client import Tracker
    from search.worker.pbt import PbtLoop
    from trainer.config import PER_TRIAL, TrainConfig

    torch.set_num_threads(1)
    quiet_libraries()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    space = parse_space(space_text, space_path)
    epochs = budget // population
    interval = max(1, epochs // 4) if strategy == "pbt" else epochs  # noexploit: never steps
    pbt = Pbt(population=population, interval=interval, mutate=mutable_names(space))
    name = f"{strategy}-s{seed}"
    study = optuna.create_study(direction="maximize", study_name=name,
                                sampler=optuna.samplers.RandomSampler(seed=seed))
    tracker = Tracker(f"sqlite:///{workdir}/mlflow-{os.getpid()}.db", name)
    parent = tracker.parent_run(None, study.study_name, space.text, space.hash)
    # one shape for the whole population (members copy only members of their shape): searched
    # shape settings fixed to the trainer's default (the notes' baseline) where the space has it
    shape = {q.name: (getattr(TrainConfig, q.name) if getattr(TrainConfig, q.name) in
                      (q.values() or [getattr(TrainConfig, q.name)]) else q.values()[0])
             for q in space.params if q.name not in PER_TRIAL}
    runner = TrialRunner(space, {**overrides, **shape, "epochs": epochs, "seed": seed}, tracker,
                         parent)
    PbtLoop(study, runner, pbt, None, RetryDeadTrial(0, tracker.uri), seed=seed).run()
    tracker.drain()
    ran = [t for t in study.trials if t.state.is_finished()]
    spent = sum(1 for t in ran for e in t.intermediate_values
                if e > t.user_attrs.get("pbt_start_epoch", 0))
    curve = [(spent, t.value) for t in ran if t.state == optuna.trial.TrialState.COMPLETE]
    return {"strategy": strategy, "seed": seed, "curve": curve, "spent": spent,
            "trials": len(ran), "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in ran),
            "epochs_per_trial": epochs, "trial_epochs": [len(t.intermediate_values) for t in ran]}


def split_ramp(strategy: str) -> tuple[str, int | None]:
    """The worker loop's ramp (`search.worker.sizing.in_flight_limit`) a strategy runs with:
    `tpe-hyperband` -> the default (`--ramp`'s), `tpe-hyperband+ramp4` -> 4 (in flight never
    more than max(4, trials heard from)), `tpe-hyperband+rampoff` -> None (the whole pack)."""
    from search.inputs.settings import DEFAULT_RAMP

    base, _, ramp = strategy.partition("+ramp")
    return base, DEFAULT_RAMP if not ramp else None if ramp == "off" else int(ramp)


def run_in_flight(strategy: str, seed: int, width: int, space_text: str, space_path: str,
                  overrides: dict, budget: int, workdir: str) -> dict:
    """One study of one strategy with `width` trials in flight, through the worker loop users
    run (`search.worker.loop.run_trials`, what `--pack width` does): asked together, reported epoch
    by epoch, a freed slot refilled at the epoch boundary. Asking stops once the study has
    trained `budget` epochs; trials in flight then finish, but what completes after the budget
    is not counted. MLflow runs go to a throwaway local store."""
    import optuna
    import torch

    from search.inputs.algorithms import make_pruner, make_sampler
    from search.inputs.space import parse_space
    from search.logs import quiet_libraries
    from search.study.recovery import RetryDeadTrial
    from search.study.session import TrialRunner
    from search.tracking.client import Tracker
    from search.worker.loop import run_trials
    from trainer import TrainConfig

    torch.set_num_threads(1)
    quiet_libraries()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    space = parse_space(space_text, space_path)
    epochs = int(overrides.get("epochs", space.fixed.get("epochs", TrainConfig.epochs)))
    base, ramp = split_ramp(strategy)
    sampler_name, pruner_name = STRATEGIES[base]
    name = f"{strategy}-w{width}-s{seed}"
    study = optuna.create_study(direction="maximize", study_name=name,
                                sampler=make_sampler(sampler_name, space, seed),
                                pruner=make_pruner(pruner_name, epochs, startup_trials=3))
    tracker = Tracker(f"sqlite:///{workdir}/mlflow-{os.getpid()}.db", name)
    parent = tracker.parent_run(None, study.study_name, space.text, space.hash)
    spent, curve, round_curve = 0, [], []
    # A round: every trial in flight trains one epoch (each pack in turn); a trial that
    # completes in a round is credited with the epochs trained by the round's end, as the
    # pack's other trials trained alongside it. Refills (`begin`) happen between rounds.
    # Rounds are the wall clock of a launch-bound GPU, where a pack's epoch costs about the
    # same at any width (benchmarks/launches.py).
    live, seen, round_end, new_round, rounds = set(), set(), 0, True, 0

    def reported(session) -> None:
        nonlocal spent, seen, round_end, new_round, rounds
        if new_round or session in seen:
            seen, round_end, new_round = set(), spent + len(live), False
            rounds += 1
        seen.add(session)
        spent += 1
        if spent >= budget:
            study.stop()  # no more asking; what is in flight finishes its epochs

    class Counted(TrialRunner):
        def begin(self, trial):
            nonlocal new_round
            session = super().begin(trial)
            live.add(session)
            new_round = True
            report, complete, fail = session.on_epoch, session.completed, session.failed

            def on_epoch(metrics, last=False, running=None):
                reported(session)
                try:
                    return report(metrics, last, running)
                except optuna.TrialPruned:
                    live.discard(session)
                    raise

            def completed(values, epoch, history=None):
                live.discard(session)
                if round_end <= budget:
                    curve.append((round_end, values[0]))
                    round_curve.append((rounds, values[0]))
                return complete(values, epoch, history)

            def failed(reason):  # diverged: the epoch that blew up was trained too
                reported(session)
                live.discard(session)
                return fail(reason)

            session.on_epoch, session.completed, session.failed = on_epoch, completed, failed
            return session

    runner = Counted(space, {**overrides, "seed": seed}, tracker, parent)
    run_trials(study, runner, width, None, None, RetryDeadTrial(0, tracker.uri), ramp=ramp)
    ran = [t for t in study.trials if t.state.is_finished()]
    return {"strategy": strategy, "seed": seed, "width": width, "curve": curve,
            "round_curve": round_curve, "rounds": rounds, "spent": spent, "trials": len(ran),
            "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in ran),
            "epochs_per_trial": epochs, "trial_epochs": [len(t.intermediate_values) for t in ran]}


def best_at(curve: list[tuple[int, float]], epochs: float) -> float | None:
    values = [v for e, v in curve if e <= epochs]
    return max(values) if values else None


def trained_on(args: argparse.Namespace) -> str:
    """What the studies trained on, for every first line and plot title: a stand-in says so."""
    label = "" if args.dataset == "cifar100" else " (not CIFAR-100)"
    return f"{args.dataset}{label}, {args.epochs}-epoch trials"


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fits(strategy: str, space) -> bool:
    if strategy == "cmaes":
        return all(p.type != "categorical" for p in space.params)
    if strategy == "gp":
        return any(p.type != "categorical" for p in space.params)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", default="seed-adamw", help="study file: its space and, for the "
                   "grid strategy, its fixed trials (default seed-adamw, the notes' AdamW table)")
    p.add_argument("--space", help="a space instead of the study file's (no grid then)")
    p.add_argument("--budget", type=int, default=48, help="epochs each study may train")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--epochs", type=int, default=2, help="epochs per trial")
    p.add_argument("--strategies", default="tpe-hyperband,tpe-median,random,cmaes,grid",
                   help="comma-separated; gp is available too (slow per trial; like TPE it "
                   "samples at random for its first 10 trials)")
    p.add_argument("--pbt-population", type=int, default=4, help="pbt strategies: members, "
                   "each trained budget / population epochs (default 4)")
    p.add_argument("--target", type=float, default=0.80,
                   help="val accuracy to reach (default 0.80: what 2-epoch digits trials reach)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="studies in parallel")
    p.add_argument("--plot", default=str(ROOT / "benchmarks" / "out" / "search_efficiency.png"))
    p.add_argument("--data-root")
    p.add_argument("--json", help="also write every study's curve and counts to this file")
    p.add_argument("--in-flight", help="comma-separated widths, e.g. 1,4,16,64: each strategy's "
                   "studies run with that many trials in flight through the packed worker loop "
                   "(`--pack W`), and the table compares the widths")
    p.add_argument("--first-seed", type=int, default=0, help="repeats use seeds from this one")
    p.add_argument("--tabulate", help="with --in-flight: no new studies; the table, plot and "
                   "last line of earlier runs' --json files (comma-separated), together")
    p.add_argument("--quick", action="store_true", help="about a minute (CI): --in-flight 1,8 "
                   "--budget 16 --repeats 1 --strategies tpe-hyperband,random --target 0.80")
    args = p.parse_args(argv)
    if args.quick:
        args.in_flight, args.budget, args.repeats = "1,8", 16, 1
        args.strategies, args.target = "tpe-hyperband,random", 0.80
    if args.in_flight:
        return main_in_flight(args, p)

    from search.inputs.space import load_space
    from search.inputs.studyfile import load_study_file

    if args.space:
        space, fixed = load_space(args.space), []
        label = space.path.name
    else:
        sf = load_study_file(args.study)
        space, fixed = sf.space, [vars(f) for f in sf.fixed_trials]
        label = f"{sf.name} (space {space.path.name}, grid of {len(fixed)} rows)"
    overrides = {"dataset": args.dataset, "epochs": args.epochs}
    if args.data_root:
        overrides["data_root"] = args.data_root
    wanted = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in STRATEGIES]
    if unknown:
        p.error(f"--strategies: unknown {unknown[0]!r}; expected {', '.join(STRATEGIES)}")
    strategies = [s for s in wanted if fits(s, space) and (s != "grid" or fixed)]
    skipped = sorted(set(wanted) - set(strategies))
    jobs = [(s, r) for r in range(args.repeats) for s in strategies]
    print(f"search efficiency: {label} on {args.dataset}, {args.epochs}-epoch trials, "
          f"budget {args.budget} epochs per study, {args.repeats} repeats (seeds 0..{args.repeats - 1}), "
          f"{len(jobs)} studies, {args.jobs} at a time"
          + (f"; skipped (do not fit the space / no grid): {', '.join(skipped)}" if skipped else ""),
          flush=True)
    start = time.time()
    workdir = tempfile.mkdtemp(prefix="search-efficiency-")  # PBT's throwaway MLflow stores
    ctx = get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        futures = [pool.submit(run_study, s, r, space.text, str(space.path), fixed, overrides,
                               args.budget, args.pbt_population, workdir) for s, r in jobs]
        results = [f.result() for f in futures]
    by = {s: [r for r in results if r["strategy"] == s] for s in strategies}
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "studies": results}, indent=1))

    header = (f"{'strategy':<14} {'best@25%':>15} {'best@50%':>15} {'best@100%':>15} "
              f"{'epochs to ' + format(args.target, '.2f'):>18} {'trials (pruned)':>16} {'epochs':>7}")
    print(header)
    print("-" * len(header))
    final: dict[str, list[float]] = {}
    for s, runs in by.items():
        cells = []
        for frac in (0.25, 0.5, 1.0):
            vals = [best_at(r["curve"], frac * args.budget) for r in runs]
            got = [v for v in vals if v is not None]
            if frac == 1.0:
                final[s] = got
            if len(got) < len(vals):
                cells.append(f"{'-':>15}" if not got else
                             f"{statistics.fmean(got):.4f} ({len(got)}/{len(vals)})".rjust(15))
            else:
                m, sd = mean_sd(got)
                cells.append(f"{m:.4f} ± {sd:.4f}".rjust(15))
        reach = [next((e for e, _ in sorted(r["curve"]) if best_at(r["curve"], e) >= args.target),
                      None) for r in runs]
        hit = [e for e in reach if e is not None]
        to_target = (f"{statistics.fmean(hit):.0f} ({len(hit)}/{len(runs)})" if hit
                     else f"never (0/{len(runs)})")
        trials = (f"{statistics.fmean(r['trials'] for r in runs):.1f} "
                  f"({statistics.fmean(r['pruned'] for r in runs):.1f})")
        spent = f"{max(r['spent'] for r in runs)}"
        print(f"{s:<14} {cells[0]} {cells[1]} {cells[2]} {to_target:>18} {trials:>16} {spent:>7}")
    print(f"({time.time() - start:.0f} s; 'epochs' is the most any study of the strategy trained; "
          f"{args.dataset} is not CIFAR-100)" if args.dataset != "cifar100" else
          f"({time.time() - start:.0f} s)")
    plot(by, args, final)
    print(verdict(final))
    return 0


def reached(curve: list[tuple[int, float]], target: float) -> int | None:
    """Epochs the study had trained when a completed trial first reached the target."""
    return next((e for e, v in sorted(curve) if v >= target), None)


def main_in_flight(args: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    """`--in-flight W1,W2,...`: every strategy at every width, R repeats each."""
    import tempfile

    from search.inputs.space import load_space
    from search.inputs.studyfile import load_study_file

    if args.tabulate:  # studies run before (their --json files): tabulate them together
        runs = [json.loads(Path(f).read_text()) for f in args.tabulate.split(",")]
        # what the studies trained on comes from their files, not from this command's defaults
        for key in ("dataset", "epochs"):
            seen = {run["args"][key] for run in runs}
            if len(seen) > 1:
                p.error(f"--tabulate: the files' studies differ in --{key}: {sorted(seen)}")
            setattr(args, key, seen.pop())
        results = [study for run in runs for study in run["studies"]]
        print(f"search efficiency in flight, tabulated: {len(results)} studies from "
              f"{args.tabulate} on {trained_on(args)}, budget {args.budget} epochs per study, "
              f"target {args.target:.2f}")
        strategies = list(dict.fromkeys(r["strategy"] for r in results))
        tabulate_in_flight(results, strategies, sorted({r["width"] for r in results}), args)
        return 0
    space = load_space(args.space) if args.space else load_study_file(args.study).space
    widths = [int(w) for w in args.in_flight.split(",")]
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if any(split_ramp(s)[0] not in STRATEGIES or s == "grid" for s in strategies):
        p.error("--strategies with --in-flight: samplers only (not grid), each optionally "
                "with +rampN or +rampoff (e.g. tpe-hyperband+rampoff)")
    overrides = {"dataset": args.dataset, "epochs": args.epochs}
    if args.data_root:
        overrides["data_root"] = args.data_root
    seeds = range(args.first_seed, args.first_seed + args.repeats)
    start = time.time()
    jobs = [(s, r, w) for w in widths for r in seeds for s in strategies]
    print(f"search efficiency in flight: space {space.path.name} on {trained_on(args)}, "
          f"budget {args.budget} epochs per study, widths {args.in_flight}, "
          f"{args.repeats} repeats (seeds {seeds.start}..{seeds.stop - 1}), target "
          f"{args.target:.2f}, {len(jobs)} studies", flush=True)
    with tempfile.TemporaryDirectory() as workdir, ProcessPoolExecutor(
            max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_in_flight, s, r, w, space.text, str(space.path),
                               overrides, args.budget, workdir) for s, r, w in jobs]
        results = [f.result() for f in futures]
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "studies": results}, indent=1))
    print(f"({time.time() - start:.0f} s)")
    tabulate_in_flight(results, strategies, widths, args)
    return 0


def tabulate_in_flight(results: list[dict], strategies: list[str], widths: list[int],
                       args: argparse.Namespace) -> None:
    """The width table, the plot and the last line, from the studies' results."""
    target = format(args.target, ".2f")
    header = (f"{'strategy':<22} {'width':>5} {'best@25%':>15} {'best@50%':>15} "
              f"{'best@100%':>15} {'epochs to ' + target:>20} {'rounds to ' + target:>17} "
              f"{'trials (pruned)':>16}")
    print(header)
    print("-" * len(header))
    # a study that never reaches the target counts as its whole budget (epochs) / run (rounds)
    to_target: dict[tuple[str, int], list[float]] = {}
    for s in strategies:
        for w in widths:
            runs = [r for r in results if r["strategy"] == s and r["width"] == w]
            if not runs:
                continue
            cells = []
            for frac in (0.25, 0.5, 1.0):
                vals = [best_at(r["curve"], frac * args.budget) for r in runs]
                got = [v for v in vals if v is not None]
                m, sd = mean_sd(got) if got else (float("nan"), 0.0)
                cells.append((f"{m:.4f} ± {sd:.4f}" if len(got) == len(vals) else
                              f"{m:.4f} ({len(got)}/{len(vals)})" if got else "-").rjust(15))
            reach = [reached(r["curve"], args.target) for r in runs]
            hits = sum(e is not None for e in reach)
            epochs = to_target[(s, w)] = [args.budget if e is None else e for e in reach]
            rounds = [e for e in (reached(r["round_curve"], args.target) for r in runs)
                      if e is not None]
            trials = (f"{statistics.fmean(r['trials'] for r in runs):.1f} "
                      f"({statistics.fmean(r['pruned'] for r in runs):.1f})")
            (me, se), (mr, sr) = mean_sd(epochs), mean_sd(rounds) if rounds else (0, 0)
            print(f"{s:<22} {w:>5} {cells[0]} {cells[1]} {cells[2]} "
                  f"{f'{me:.0f} ± {se:.0f} ({hits}/{len(runs)})':>20} "
                  f"{f'{mr:.0f} ± {sr:.0f}' if rounds else '-':>17} {trials:>16}")
    print(f"(a study that never reaches the target counts as {args.budget} epochs; (k/n): "
          "studies that reached it; rounds: of those that did. A round: every trial in flight "
          "trains one epoch -- a launch-bound GPU's time)")
    plot_in_flight(to_target, strategies, widths, args)
    widest = max(widths)

    def ratio(s: str) -> str:
        if (s, 1) not in to_target or (s, widest) not in to_target:
            return "n/a"
        return f"{statistics.fmean(to_target[(s, widest)]) / statistics.fmean(to_target[(s, 1)]):.2f}"

    print(f"epochs_to_target_ratio_p{widest}_vs_p1: {ratio('tpe-hyperband')} "
          f"(random: {ratio('random')})")


def plot_in_flight(to_target: dict, strategies: list[str], widths: list[int],
                   args: argparse.Namespace) -> None:
    """Epochs to the target against trials in flight, mean ± sd per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in strategies:
        ws = [w for w in widths if (s, w) in to_target]
        values = [to_target[(s, w)] for w in ws]
        means = [statistics.fmean(v) for v in values]
        sds = [mean_sd(v)[1] for v in values]
        ax.errorbar(ws, means, yerr=sds, marker="o", capsize=3, label=s)
    ax.set_xscale("log", base=2)
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.set_xlabel("trials in flight (--pack)")
    ax.set_ylabel(f"epochs until a trial reaches {args.target:.2f}")
    ax.set_title(f"{trained_on(args)}, "
                 f"{max(len(v) for v in to_target.values())} repeats, mean ± sd")
    ax.legend()
    out = Path(args.plot).with_name(Path(args.plot).stem + "_in_flight.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"plot: {out}")


def verdict(final: dict[str, list[float]]) -> str:
    """The last line: TPE + Hyperband against random search, in points of accuracy."""
    line = "tpe_hyperband_vs_random: "
    a, b = final.get("tpe-hyperband"), final.get("random")
    if a and b:
        (ma, sa), (mb, sb) = mean_sd(a), mean_sd(b)
        diff = 100 * (ma - mb)
        spread = 100 * max(sa, sb)
        line += f"{diff:+.1f} points at equal budget"
        if abs(diff) <= spread:
            line += f" (no difference: the spread across repeats is {spread:.1f})"
    else:
        line += "n/a (run both tpe-hyperband and random)"
    grid = final.get("grid")
    line += f", grid: {100 * statistics.fmean(grid):.1f}" if grid else ", grid: n/a"
    pbt, tpe, rnd = final.get("pbt"), final.get("tpe-hyperband"), final.get("random")
    if pbt:  # PBT minus TPE + Hyperband in points (random: PBT minus random search)
        def minus(other):
            return f"{100 * (statistics.fmean(pbt) - statistics.fmean(other)):+.1f}" if other else "n/a"

        line += f"\npbt_vs_tpe_hyperband_best_at_budget: {minus(tpe)} (random: {minus(rnd)})"
    return line


def plot(by: dict[str, list[dict]], args: argparse.Namespace, final) -> None:
    """Best-so-far against epochs spent: the mean per strategy, a band of ± one sd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = list(range(1, args.budget + args.epochs + 1))
    fig, ax = plt.subplots(figsize=(8, 5))
    for s, runs in by.items():
        points = []
        for x in xs:
            vals = [best_at(r["curve"], x) for r in runs]
            if all(v is not None for v in vals):
                m, sd = mean_sd(vals)
                points.append((x, m, sd))
        if not points:
            continue
        x, m, sd = zip(*points, strict=True)
        ax.plot(x, m, label=s)
        ax.fill_between(x, [a - b for a, b in zip(m, sd, strict=True)],
                        [a + b for a, b in zip(m, sd, strict=True)], alpha=0.2)
    ax.axvline(args.budget, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("epochs trained (all trials of the study)")
    ax.set_ylabel("best validation accuracy so far")
    ax.set_title(f"{trained_on(args)}, {args.repeats} repeats, mean ± sd")
    ax.legend()
    out = Path(args.plot)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"plot: {out}")


if __name__ == "__main__":
    sys.exit(main())
