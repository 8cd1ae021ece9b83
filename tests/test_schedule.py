"""The per-epoch lr: torch's CosineAnnealingLR curve (T_max may differ from epochs), warm-up,
and batch-size scaling relative to 64."""

import math

import pytest
import torch

from trainer.config import TrainConfig
from trainer.schedule import lr_at, scaled_lr


@pytest.mark.parametrize("t_max", [100, 150, 200])
def test_cosine_matches_torch_when_t_max_differs_from_epochs(t_max):
    config = TrainConfig(optimizer="sgdm", lr=0.01, epochs=150, t_max=t_max)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max)
    for epoch in range(150):
        assert lr_at(config, epoch) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12)
        opt.step()
        sched.step()


def test_warmup_rises_linearly_then_cosine_starts_at_peak():
    config = TrainConfig(optimizer="lars", lr=2.0, epochs=20, warmup_epochs=4)
    assert [lr_at(config, e) for e in range(4)] == pytest.approx([0.4, 0.8, 1.2, 1.6])
    assert lr_at(config, 4) == pytest.approx(2.0)
    assert lr_at(config, 19) < lr_at(config, 5)


def test_batch_size_scaling_rules():
    assert scaled_lr(TrainConfig(lr=0.1, batch_size=1024, lr_scaling="linear")) == pytest.approx(1.6)
    assert scaled_lr(TrainConfig(lr=0.1, batch_size=1024, lr_scaling="sqrt")) == pytest.approx(0.4)
    assert scaled_lr(TrainConfig(lr=0.1, batch_size=1024)) == pytest.approx(0.1)
    constant = TrainConfig(lr=0.1, schedule="constant", epochs=10)
    assert {lr_at(constant, e) for e in range(10)} == {0.1}
    assert math.isclose(lr_at(TrainConfig(lr=0.1, epochs=10), 0), 0.1)
