"""How many trials a worker trains at once as one stacked model: `--pack auto` and `--ramp`.

On a GPU a LeNet-5 step is launch-bound (benchmarks/launches.py): a pack of P trials costs
about the launches of one, so the widest pack the device holds is the fastest. On the CPU,
compute-bound, packing is neutral (benchmarks/pack.py), so `auto` is 1 there. On CUDA:

    P = min(64, trials this worker has left to ask, (free memory / 2) / memory per trial)

with memory per trial estimated from the largest batch size the space can draw and the network
(parameters, gradients and optimiser state of each of its K rows; activations -- every layer's
output and its gradient, measured on the meta device, nothing allocated -- and augmentation of
a batch; an epoch's augmentation plan: the widest preset's columns over CIFAR-100's training
split; all read from the trainer). Half the free memory is the margin for the estimate; a pack
that still runs out of memory is halved by the worker (`search.worker.loop`), never a crash.

`--ramp R` (default 10) bounds the pack while the study knows little: never more trials in
flight than max(R, trials the study has heard from), less those other workers train, so a
sampler does not propose a wide pack before it has heard from any trial (measured in
benchmarks/search_efficiency.py --in-flight; README "Many trials in flight").
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import optuna

from trainer.catalogue import CLASSES, train_split_size
from trainer.config import TrainConfig

AUTO_CAP = 64  # wider packs gain little: ~5 launches per trial-step at 64 already
MEMORY_SHARE = 0.5
PARAMETER_COPIES = 8  # weights, gradient, its flat copy, two optimiser buffers, temporaries
AUGMENT_BYTES = 150_000  # per sample: the augmentation's live temporaries (3x32x32 fp32 each)


@functools.cache
def _plan_bytes() -> int:
    """An epoch's augmentation plan in bytes: the widest preset's columns over CIFAR-100's
    training split, from the trainer itself."""
    from trainer.augment import PRESETS, Augment

    columns = max(Augment(name).plan_width(sync_free=True) for name in PRESETS)
    return train_split_size("cifar100", TrainConfig.val_fraction) * columns * 4


@functools.lru_cache(maxsize=16)
def network_bytes(model: str = "lenet5", model_args: tuple = ()) -> tuple[int, int]:
    """(the network's parameters for CIFAR-100's classes, activation bytes per sample: every
    layer's output and its gradient, fp32), measured on the meta device: nothing allocated,
    nothing computed (LeNet-5: 815,332 and ~1.0 MB)."""
    import torch

    from trainer.catalogue import IMAGE_SHAPE
    from trainer.networks import build

    with torch.device("meta"):
        net = build(model, CLASSES["cifar100"], dict(model_args))
        outputs: list[int] = []

        def count(_module, _inputs, out) -> None:
            if isinstance(out, torch.Tensor):
                outputs.append(out.numel())

        hooks = [m.register_forward_hook(count) for m in net.modules() if not list(m.children())]
        net(torch.zeros(2, *IMAGE_SHAPE))  # two: BatchNorm refuses one sample when training
        for hook in hooks:
            hook.remove()
    return sum(p.numel() for p in net.parameters()), sum(outputs) // 2 * 4 * 2


def in_flight_limit(study: optuna.Study, pack: int, ramp: int | None, mine: int) -> int:
    """How many trials a worker holding `mine` may have in flight now: `pack`, or with a ramp
    never more than the study may -- max(ramp, trials it has heard from), less those other
    workers train, yet at least one. The width doubles as results come in, so a wide pack is
    never proposed blind (`--ramp`)."""
    if ramp is None or ramp >= pack:
        return pack
    state = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False, states=(state.COMPLETE, state.PRUNED, state.RUNNING))
    running = sum(t.state == state.RUNNING for t in trials)
    allowed = max(ramp, len(trials) - running) - (running - mine)
    return min(pack, max(1, allowed))


@dataclass(frozen=True)
class AutoPack:
    pack: int
    line: str  # what was chosen and why, for the worker's log


def trial_bytes(batch_size: int, local_workers: int = 1, model: str = "lenet5",
                model_args: tuple = ()) -> int:
    """Estimated device memory one trial holds while it trains (fp32 throughout)."""
    parameters, activations = network_bytes(model, model_args)
    per_row = parameters * 4 * PARAMETER_COPIES
    per_batch = batch_size * (activations + AUGMENT_BYTES)  # K rows share the batch
    return local_workers * per_row + per_batch + _plan_bytes()


def auto_pack(device: str, batch_size: int, local_workers: int, trials_left: int | None,
              free_bytes: int | None = None, model: str = "lenet5",
              model_args: tuple = ()) -> AutoPack:
    """The pack `--pack auto` gives a worker on `device` (free_bytes: its free memory, read from
    the device when None)."""
    if not device.startswith("cuda"):
        return AutoPack(1, f"--pack auto: 1 trial at a time on {device} (packing pays on a GPU)")
    if free_bytes is None:
        import torch

        free_bytes, _ = torch.cuda.mem_get_info(torch.device(device))
    each = trial_bytes(batch_size, local_workers, model, model_args)
    fits = max(1, int(free_bytes * MEMORY_SHARE // each))
    limits = {"memory": fits, "cap": AUTO_CAP}
    if trials_left is not None:
        limits["trials left"] = max(1, trials_left)
    pack = min(limits.values())
    why = next(name for name, value in limits.items() if value == pack)
    return AutoPack(pack, f"--pack auto: {pack} trials in flight on {device} "
                          f"({free_bytes / 2**30:.1f} GiB free, ~{each / 2**30:.2f} GiB per trial "
                          f"at batch {batch_size}; bounded by {why})")
