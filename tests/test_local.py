"""Local methods: averaging and SlowMo by hand, per trial of a pack; K=4, H=8 learns digits;
a local run resumes exactly."""

import numpy as np
import pytest
import torch

from trainer import TrainConfig, train
from trainer.local import average_workers, shards


def _slowmo_step(params, beta, alpha, gamma, sync, u):
    """One averaging of params["w"]; SlowMo's state kept in the sync / u dicts."""
    new_sync, new_u = average_workers(params["w"], params["w"].shape[0], beta, alpha,
                                      torch.tensor([gamma]), sync.get("w"), u.get("w"))
    if new_sync is not None:
        sync["w"], u["w"] = new_sync, new_u


def test_averaging_by_hand():
    params = {"w": torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 1.0]])}  # one trial, K = 3 copies
    _slowmo_step(params, 0.0, 1.0, 0.1, {}, {})
    torch.testing.assert_close(params["w"], torch.tensor([[3.0, 3.0]] * 3))


def test_slowmo_by_hand():
    sync, u = {"w": torch.tensor([[1.0, -1.0]])}, {"w": torch.zeros(1, 2)}  # synced at (1, -1)
    gamma, beta, alpha = 0.1, 0.5, 2.0
    params = {"w": torch.tensor([[0.8, -1.2], [0.6, -0.6]])}  # after local steps: mean (0.7, -0.9)
    _slowmo_step(params, beta, alpha, gamma, sync, u)
    # u1 = 0.5 * 0 + (x0 - avg) / gamma = (3, -1); x1 = x0 - alpha * gamma * u1 = (0.4, -0.8)
    torch.testing.assert_close(u["w"], torch.tensor([[3.0, -1.0]]))
    torch.testing.assert_close(params["w"], torch.tensor([[0.4, -0.8]] * 2))
    params["w"] = torch.tensor([[0.3, -0.8], [0.3, -0.6]])  # mean (0.3, -0.7)
    _slowmo_step(params, beta, alpha, gamma, sync, u)
    # u2 = 0.5 * (3, -1) + ((0.4, -0.8) - (0.3, -0.7)) / 0.1 = (2.5, -1.5); x2 = x1 - 0.2 * u2
    torch.testing.assert_close(u["w"], torch.tensor([[2.5, -1.5]]))
    torch.testing.assert_close(params["w"], torch.tensor([[-0.1, -0.5]] * 2))


def test_only_the_due_trials_of_a_pack_average():
    """Two packed trials of K = 2 whose H-step counters are out of phase: one averages."""
    params = {"w": torch.tensor([[1.0], [3.0], [5.0], [9.0]])}  # trial 0 rows 0-1, trial 1 rows 2-3
    sync, u = {"w": torch.tensor([[2.0], [7.0]])}, {"w": torch.zeros(2, 1)}
    sync["w"], u["w"] = average_workers(params["w"], 2, 0.5, 1.0, torch.tensor([0.1, 0.1]),
                                        sync["w"], u["w"], due=torch.tensor([False, True]))
    torch.testing.assert_close(params["w"][:2], torch.tensor([[1.0], [3.0]]))  # untouched
    torch.testing.assert_close(params["w"][2:], torch.tensor([[7.0], [7.0]]))  # mean 7, no drift
    torch.testing.assert_close(sync["w"], torch.tensor([[2.0], [7.0]]))


def test_shards_iid_are_stratified_and_noniid_split_classes():
    labels = np.repeat(np.arange(10), 40)
    iid = shards(labels, 4, "iid", seed=0)
    assert sorted(np.concatenate(iid).tolist()) == list(range(400))
    assert all(np.bincount(labels[s], minlength=10).tolist() == [10] * 10 for s in iid)
    noniid = shards(labels, 4, "noniid", seed=0)
    classes = [set(labels[s].tolist()) for s in noniid]
    assert sum(len(c) for c in classes) == 10 and not set.intersection(*classes[:2])


@pytest.mark.slow
def test_k4_h8_learns_digits(cli):
    import json

    r = cli("train", "--dataset", "digits", "--optimizer", "sgdm", "--augment", "none",
            "--epochs", "8", "--local-workers", "4", "--local-steps", "8", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["best_val_acc"] >= 0.85
    assert out["history"][-1]["comm_rounds"] == 8 * 18 // 8


@pytest.mark.slow
def test_local_run_resumes_from_a_checkpoint_exactly():
    import io

    config = TrainConfig(dataset="digits", optimizer="sgdm", epochs=3, augment="flip-crop",
                         batch_size=64, local_workers=2, local_steps=5, slowmo_beta=0.5,
                         slowmo_lr=1.0, seed=4)
    saved = {}

    def keep(state):
        if state["epoch"] == 1:
            buf = io.BytesIO()
            torch.save(state, buf)
            saved["bytes"] = buf.getvalue()

    full = train(config, on_checkpoint=keep)
    state = torch.load(io.BytesIO(saved["bytes"]), weights_only=True)
    resumed = train(config, resume=state)
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in full.history]
    assert [h["comm_rounds"] for h in resumed.history] == [h["comm_rounds"] for h in full.history]
