"""Packed trials: stacked optimisers row by row against their references; a pack of trials
with different hyperparameters gives each trial the numbers it gets alone, including trials
that join late and trials resumed from a checkpoint written alone."""

import pytest
import torch

from trainer import TrainConfig, train
from trainer.engine import Engine
from trainer.optim import LAMB, LARS
from trainer.runtime import prepare
from trainer.stacked_optim import Layout, StackedOptimizer

ROWS = [  # per-row hyperparameters: every one differs between rows
    {"lr": 0.05, "momentum": 0.9, "beta2": 0.999, "weight_decay": 1e-4, "trust_coefficient": 0.001,
     "lamb_clamp": 10.0},
    {"lr": 0.2, "momentum": 0.5, "beta2": 0.99, "weight_decay": 0.05, "trust_coefficient": 0.02,
     "lamb_clamp": 0.5},
    {"lr": 0.01, "momentum": 0.0, "beta2": 0.9, "weight_decay": 0.0, "trust_coefficient": 0.01,
     "lamb_clamp": 2.0},
]


def _reference(name, params, h):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=h["lr"], betas=(h["momentum"], h["beta2"]),
                                 weight_decay=h["weight_decay"])
    if name == "sgdm":
        return torch.optim.SGD(params, lr=h["lr"], momentum=h["momentum"],
                               weight_decay=h["weight_decay"])
    if name == "lars":
        return LARS(params, lr=h["lr"], momentum=h["momentum"], weight_decay=h["weight_decay"],
                    trust_coefficient=h["trust_coefficient"])
    return LAMB(params, lr=h["lr"], betas=(h["momentum"], h["beta2"]),
                weight_decay=h["weight_decay"], clamp=(0.0, h["lamb_clamp"]))


@pytest.mark.parametrize("name", ["adamw", "sgdm", "lars", "lamb"])
def test_stacked_optimizer_matches_its_reference_row_by_row(name):
    gen = torch.Generator().manual_seed(0)
    # adapted (2-D, 3-D) and not (1-D) for LARS/LAMB: three segments of the flat buffer
    shapes = {"weight": (6, 5), "bias": (6,), "conv": (2, 3, 2)}
    start = {n: torch.randn(len(ROWS), *s, generator=gen) for n, s in shapes.items()}
    layout = Layout.of(start)
    flat = layout.flatten(start)
    stacked = layout.views(flat)
    hyper = {k: torch.tensor([r[k] for r in ROWS], dtype=torch.float64) for k in ROWS[0]}
    opt = StackedOptimizer(name, layout, len(ROWS), hyper)
    refs = []
    for i, h in enumerate(ROWS):
        ps = [start[n][i].clone().requires_grad_() for n in shapes]
        refs.append((ps, _reference(name, ps, h)))
    for step in range(6):
        grads = {n: torch.randn(len(ROWS), *s, generator=gen) for n, s in shapes.items()}
        if step == 3:  # the schedule changes lr between steps, per row
            opt.hyper["lr"] = opt.hyper["lr"] * torch.tensor([0.5, 0.25, 2.0], dtype=torch.float64)
            for (_, ref), f in zip(refs, [0.5, 0.25, 2.0], strict=True):
                for group in ref.param_groups:
                    group["lr"] *= f
        opt.step(flat, layout.flatten(grads))
        for i, (ps, ref) in enumerate(refs):
            for p, n in zip(ps, shapes, strict=True):
                p.grad = grads[n][i].clone()
            ref.step()
    for i, (ps, _) in enumerate(refs):
        for p, n in zip(ps, shapes, strict=True):
            # torch's own two: the same float32 ops, so to the last bit or two
            tight = name in ("adamw", "sgdm")
            torch.testing.assert_close(stacked[n][i], p.detach(), rtol=1e-6 if tight else 1e-5,
                                       atol=1e-7 if tight else 1e-6)
        assert not torch.equal(stacked["weight"][i], start["weight"][i])


def _close(a, b, rel=1e-4):
    """Losses and lr within `rel`. Accuracies are counts: the last bits of a stacked (grouped)
    convolution can flip the arg-max of a near-tie, so they may differ by a few samples."""
    for ha, hb in zip(a, b, strict=True):
        for key in ("train_loss", "val_loss", "lr"):
            assert hb[key] == pytest.approx(ha[key], rel=rel, abs=1e-7), (key, ha, hb)
        assert abs(hb["train_acc"] - ha["train_acc"]) <= 3e-3, (ha, hb)
        assert abs(hb["val_acc"] - ha["val_acc"]) <= 1.1e-2, (ha, hb)  # 3 of 288


def _pack_run(configs, join_at, epochs, resume=None, vmap_rows=True):
    """Runs configs in one engine; configs[i] joins before epoch join_at[i] (0-based).
    vmap_rows: the accelerators' batched forward, forced here on the CPU."""
    engine = Engine(prepare(configs[0]))
    engine.accelerated = vmap_rows
    members = {}
    for epoch in range(epochs):
        for i, c in enumerate(configs):
            if join_at[i] == epoch:
                members[i] = engine.add(c, (resume or {}).get(i))
        for m, _, error in engine.run_epoch():
            assert error is None
            if m.epoch == m.config.epochs:
                engine.remove(m)
    return {i: m.history for i, m in members.items()}


@pytest.mark.slow
def test_pack_of_four_matches_each_trial_alone_with_a_late_joiner():
    base = dict(dataset="digits", optimizer="sgdm", augment="final", epochs=2, batch_size=64)
    configs = [TrainConfig(**base, lr=0.02, weight_decay=1e-4, momentum=0.9, seed=1),
               TrainConfig(**base, lr=0.01, weight_decay=5e-3, momentum=0.5, seed=2),
               TrainConfig(**base, lr=0.02, weight_decay=0.0, momentum=0.8, seed=3,
                           warmup_epochs=1),
               TrainConfig(**base, lr=0.005, weight_decay=1e-3, momentum=0.95, seed=4,
                           schedule="constant")]
    packed = _pack_run(configs, join_at=[0, 0, 0, 1], epochs=3)  # the 4th fills a slot late
    looped = _pack_run(configs, join_at=[0, 1, 0, 0], epochs=3, vmap_rows=False)  # CPU default
    for i, c in enumerate(configs):
        alone = train(c).history
        assert len(packed[i]) == 2
        _close(alone, packed[i])
        _close(alone, looped[i], rel=1e-5)
    assert packed[0][0]["train_loss"] != packed[1][0]["train_loss"]


@pytest.mark.slow
def test_local_sgd_pack_matches_alone_and_a_checkpoint_resumes_in_a_pack():
    base = dict(dataset="digits", optimizer="sgdm", augment="flip-crop", epochs=2,
                batch_size=64, local_workers=2, local_steps=5, slowmo_beta=0.5, slowmo_lr=1.0)
    a = TrainConfig(**base, lr=0.02, seed=1)
    b = TrainConfig(**base, lr=0.01, momentum=0.5, weight_decay=1e-3, seed=2)
    saved = {}
    alone_a = train(a, on_checkpoint=lambda s: saved.setdefault(s["epoch"], s)).history
    alone_b = train(b).history
    # a resumes from its epoch-1 checkpoint written alone; b starts fresh beside it
    packed = _pack_run([a, b], join_at=[0, 0], epochs=2, resume={0: saved[1]})
    _close(alone_a[1:], packed[0][1:])
    _close(alone_b, packed[1])
    assert [h["comm_rounds"] for h in packed[0]] == [h["comm_rounds"] for h in alone_a]


def test_trials_of_one_seed_share_its_initial_weights_and_never_change_them():
    from trainer.model import LeNet5
    from trainer.networks import initial_state

    base = dict(dataset="digits", optimizer="sgdm", augment="none", epochs=1, batch_size=128, seed=7)
    configs = [TrainConfig(**base, lr=0.05), TrainConfig(**base, lr=0.01)]
    packed = _pack_run(configs, join_at=[0, 0], epochs=1)
    torch.manual_seed(7)
    fresh = dict(LeNet5(10).named_parameters())
    shared, _ = initial_state("lenet5", (), 7, 10)  # what both trials started from, after they trained
    assert all(torch.equal(shared[n], p.detach()) for n, p in fresh.items())
    assert packed[0][0]["train_loss"] != packed[1][0]["train_loss"]  # they trained apart


def test_packs_of_other_shapes_share_one_copy_of_the_data():
    """A worker's packs of other batch sizes (a PBT member's new pack too) train on the one
    copy of the dataset already on the device; another split is loaded apart."""
    from trainer.runtime import prepare, prepare_sharing

    first = prepare(TrainConfig(dataset="digits", batch_size=64))
    other = TrainConfig(dataset="digits", batch_size=128, augment="none")
    shared = prepare_sharing(other, [first])
    assert shared.config is other and shared.train.x is first.train.x
    assert shared.val.y is first.val.y
    apart = prepare_sharing(TrainConfig(dataset="digits", val_fraction=0.5), [first])
    assert apart.train.x is not first.train.x and len(apart.val.y) != len(first.val.y)
