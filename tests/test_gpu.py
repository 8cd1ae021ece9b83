"""GPU readiness (run where CUDA exists, skipped elsewhere; `benchmarks/gpu_check.sh` runs
them): a packed epoch's steps never wait for the device, bf16 autocast trains like fp32, and a
network with BatchNorm and Dropout runs its rows as one batched model on the GPU."""

import pytest
import torch

from trainer import TrainConfig
from trainer.engine import Engine
from trainer.local import average_plan
from trainer.runtime import prepare

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _engine(precision: str, local_workers: int = 1, pack: int = 4) -> Engine:
    base = dict(dataset="digits", augment="final", epochs=2, batch_size=64, device="cuda",
                precision=precision, local_workers=local_workers, local_steps=3,
                slowmo_beta=0.5 if local_workers > 1 else 0.0)
    engine = Engine(prepare(TrainConfig(**base)))
    for i in range(pack):
        engine.add(TrainConfig(**base, optimizer="lamb", lr=1e-3 * (i + 1), seed=i))
    return engine


@pytest.mark.parametrize("local_workers", [1, 2])
def test_packed_steps_have_no_host_sync(local_workers):
    engine = _engine("bf16", local_workers)
    engine.run_epoch()  # warm-up: kernels, cached constants, the stacked state
    lrs = torch.full((len(engine.members),), 1e-3, device="cuda")
    plan = (average_plan([m.step for m in engine.members], engine.h, engine.steps_per_epoch,
                         engine.setup.device) if engine.local else [])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss_sum, correct, _, _ = engine.train_steps(lrs, plan)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss_sum).all() and correct.sum() > 0


def test_bf16_trains_like_fp32():
    fp32 = [m["train_loss"] for _, m, _ in _engine("fp32").run_epoch()]
    bf16 = [m["train_loss"] for _, m, _ in _engine("bf16").run_epoch()]
    assert bf16 == pytest.approx(fp32, rel=0.05)


def test_a_batchnorm_network_runs_batched_on_the_gpu():
    """torchvision's resnet18 (BatchNorm) passes the engine's dry step on the device: its rows
    run as one vmapped model, each with its own statistics."""
    base = dict(dataset="digits", augment="none", epochs=1, batch_size=64, device="cuda",
                model="torchvision:resnet18")
    engine = Engine(prepare(TrainConfig(**base)))
    assert engine.accelerated and engine.unbatched is None, engine.unbatched
    members = [engine.add(TrainConfig(**base, lr=1e-3 * (i + 1), seed=i)) for i in range(2)]
    results = engine.run_epoch()
    assert all(error is None for _, _, error in results)
    a, b = (engine.state(m)["buffers"]["bn1.running_mean"] for m in members)
    assert not torch.equal(a, b)
