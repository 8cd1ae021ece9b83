"""Kernel launches per packed step (issue 19): on a GPU a LeNet-5 step is launch-bound, so
the count of ops that launch a kernel IS the speed. Counted, not timed: the accelerator code
path (`Engine.accelerated`: vmapped rows, sync-free augmentation) is forced on the CPU and every
aten op of a few steady-state steps is seen by a TorchDispatchMode; views, aliases and bare
allocations launch nothing and are not counted.

    python benchmarks/launches.py            # P in 1, 4, 16, 64; SGDM and AdamW; by phase
    python benchmarks/launches.py --model torchvision:resnet18 --packs 1,16   # another network

Last line: `ops_per_step_p16_sgdm: A ops_per_step_p16_adamw: B ops_per_trial_step_p64: C`
(C: the larger of SGDM's and AdamW's at P = 64, divided by 64).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from search.cli.train import model_arg  # noqa: E402
from trainer import TrainConfig  # noqa: E402
from trainer.engine import Engine  # noqa: E402
from trainer.local import average_plan  # noqa: E402
from trainer.runtime import prepare  # noqa: E402

# ops that allocate or re-describe memory without a kernel
NO_KERNEL = {"empty", "empty_strided", "empty_like", "detach", "lift_fresh", "_reshape_alias",
             "_unsafe_view",
             "set_", "resize_"}
# ops that make the host wait for the device (a sync inside the steps stalls the GPU's queue)
# (the `_ex` linalg variants return their error codes on the device instead: those are fine)
SYNCING = {"_local_scalar_dense", "item", "nonzero", "masked_select", "unique", "_unique",
           "_unique2", "unique_dim", "unique_consecutive", "equal", "is_nonzero",
           "_linalg_check_errors", "_assert_async", "repeat_interleave"}
PHASES = ("augment", "forward", "backward", "optimiser", "other")  # other: data, metrics


def op_name(func) -> str:
    return func._schema.name.split("::")[-1]


def launches_kernel(func) -> bool:
    return not (func.is_view or op_name(func) in NO_KERNEL)


def waits_for_device(func, args) -> bool:
    """A sync op, or indexing with a boolean mask (its result's shape needs the mask's count)."""
    if op_name(func) in SYNCING:
        return True
    return op_name(func) in ("index", "index_put", "index_put_") and any(
        isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)


class OpCounter(TorchDispatchMode):
    """Counts kernel-launching aten ops by `phase` (set by the caller); with `forbid_sync`,
    raises on any op that would make the host wait for the device, naming it and its phase."""

    def __init__(self, forbid_sync: bool = False):
        super().__init__()
        self.phase, self.counts, self.forbid_sync = "other", Counter(), forbid_sync
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.forbid_sync and waits_for_device(func, args):
            raise AssertionError(f"{func} in the {self.phase} phase waits for the device")
        if launches_kernel(func):
            self.counts[self.phase] += 1
            self.ops[(self.phase, str(func))] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def phases(engine: Engine, counter: OpCounter):
    """Attributes the engine's ops to phases by wrapping the methods each phase runs in."""
    def tagged(phase, fn):
        def run(*args, **kwargs):
            before, counter.phase = counter.phase, phase
            try:
                return fn(*args, **kwargs)
            finally:
                counter.phase = before
        return run

    originals = {}
    targets = [(engine.augment, "apply_plan", "augment"), (engine.augment, "plan", "augment"),
               (engine.augment, "draw", "augment"),
               (engine, "_forward", "forward"), (engine.optimizer, "step", "optimiser")]
    for obj, name, phase in targets:
        originals[(obj, name)] = getattr(obj, name)
        setattr(obj, name, tagged(phase, getattr(obj, name)))
    backward = torch.Tensor.backward
    torch.Tensor.backward = tagged("backward", backward)
    try:
        yield
    finally:
        torch.Tensor.backward = backward
        for (obj, name), fn in originals.items():
            setattr(obj, name, fn)


def packed_engine(optimizer: str, pack: int, augment: str = "final", local_workers: int = 1,
                  batch_size: int = 64, model: str = "lenet5",
                  model_args: dict | None = None) -> Engine:
    """A warmed-up pack of `pack` trials on the accelerator path, forced on the CPU."""
    base = dict(dataset="digits", augment=augment, epochs=3, batch_size=batch_size,
                model=model, model_args=dict(model_args or {}),
                device="cpu", precision="fp32", local_workers=local_workers,
                local_steps=3 if local_workers > 1 else 1,
                slowmo_beta=0.5 if local_workers > 1 else 0.0)
    engine = Engine(prepare(TrainConfig(**base, optimizer=optimizer)))
    engine.accelerated = True
    for i in range(pack):
        engine.add(TrainConfig(**base, optimizer=optimizer, lr=1e-3 * (i + 1), seed=i))
    engine.run_epoch(stop=lambda done, left, seconds: done >= 1)  # stacks, warms caches
    return engine


def count_steps(engine: Engine, steps: int = 3, forbid_sync: bool = False) -> OpCounter:
    """The ops of `steps` steps of every member (and of the epoch's data order, drawn first)."""
    lrs = torch.full((len(engine.members),), 1e-3)
    plan = (average_plan([m.step for m in engine.members], engine.h, engine.steps_per_epoch,
                         engine.setup.device) if engine.local else [])
    counter = OpCounter(forbid_sync)
    with phases(engine, counter), counter:
        engine.train_steps(lrs, plan, stop=lambda done, left, seconds: done >= steps)
    return counter


def per_step(optimizer: str, pack: int, steps: int = 3, model: str = "lenet5",
             model_args: dict | None = None) -> dict[str, float]:
    """Steady-state ops per step by phase: the difference between `steps` and one step, so
    the epoch's one-off data order drops out."""
    engine = packed_engine(optimizer, pack, model=model, model_args=model_args)
    one, many = count_steps(engine, 1), count_steps(engine, 1 + steps)
    return {phase: (many.counts[phase] - one.counts[phase]) / steps for phase in PHASES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--packs", default="1,4,16,64")
    ap.add_argument("--optimizers", default="sgdm,adamw")
    ap.add_argument("--top", type=int, default=0, help="also list the N most frequent ops")
    ap.add_argument("--model", default="lenet5", help="the network (the `model` setting: "
                    "torchvision:resnet18, PATH.py:FUNCTION, ...)")
    ap.add_argument("--model-arg", action="append", default=[], metavar="NAME=VALUE",
                    type=model_arg, help="an argument of its factory (YAML value)")
    args = ap.parse_args()
    model_args = dict(args.model_arg)
    print(f"network {args.model}" + (f" {model_args}" if model_args else ""))
    torch.set_num_threads(2)
    packs = [int(p) for p in args.packs.split(",")]
    total = {}
    print(f"{'optimiser':<9} {'P':>3} " + " ".join(f"{p:>9}" for p in PHASES)
          + f" {'per step':>9} {'per trial':>9}")
    for opt in args.optimizers.split(","):
        for p in packs:
            counts = per_step(opt, p, model=args.model, model_args=model_args)
            total[(opt, p)] = sum(counts.values())
            print(f"{opt:<9} {p:>3} " + " ".join(f"{counts[ph]:>9.0f}" for ph in PHASES)
                  + f" {total[(opt, p)]:>9.0f} {total[(opt, p)] / p:>9.1f}")
    if args.top:
        engine = packed_engine(args.optimizers.split(",")[0], packs[-1], model=args.model,
                               model_args=model_args)
        for (phase, op), n in count_steps(engine, 1).ops.most_common(args.top):
            print(f"  {n:>4} {phase:<9} {op}")
    widest = max(packs)
    print(f"ops_per_step_p16_sgdm: {total.get(('sgdm', 16), float('nan')):.0f} "
          f"ops_per_step_p16_adamw: {total.get(('adamw', 16), float('nan')):.0f} "
          f"ops_per_trial_step_p{widest}: "
          f"{max(total[(o, widest)] for o in args.optimizers.split(',')) / widest:.1f}")


if __name__ == "__main__":
    main()
