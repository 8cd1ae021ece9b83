"""The GPU path without a GPU: a packed step on the accelerator code path (vmapped rows,
sync-free augmentation), forced on the CPU under a TorchDispatchMode that fails on any op that
would make the host wait for the device (`.item()`, `nonzero`, boolean indexing, `unique`,
error-checking linalg, ...). tests/test_gpu.py checks the same on CUDA where one exists."""

import pytest
import torch

from benchmarks.launches import OpCounter, count_steps, packed_engine


@pytest.mark.parametrize("optimizer,local_workers", [
    ("sgdm", 1), ("adamw", 1), ("lars", 1), ("lamb", 1), ("sgdm", 2)])
def test_packed_steps_never_wait_for_the_device(optimizer, local_workers):
    engine = packed_engine(optimizer, pack=3, local_workers=local_workers)
    counter = count_steps(engine, steps=3, forbid_sync=True)
    assert counter.counts["optimiser"] > 0 and counter.counts["augment"] > 0
    if local_workers > 1:  # a SlowMo pack (H = 3) averaged at the third step: workers agree
        workers = engine.flat.view(3, local_workers, -1)
        assert torch.equal(workers[:, 0], workers[:, 1]) and engine.sync is not None


def test_the_guard_catches_what_would_sync():
    x = torch.arange(6.0)
    for wait in (lambda: x.sum().item(), lambda: x.nonzero(), lambda: x[x > 2],
                 lambda: torch.linalg.solve(torch.eye(2), torch.ones(2))):
        with pytest.raises(AssertionError, match="waits for the device"), OpCounter(forbid_sync=True):
            wait()
    # the CPU's own path does sync (colour jitter picks its hue rows): the guard sees it
    engine = packed_engine("sgdm", pack=2)
    engine.accelerated = False
    with pytest.raises(AssertionError, match="augment phase waits for the device"):
        count_steps(engine, steps=1, forbid_sync=True)
