"""Local methods (Step 3 of the notes): LocalSGD and SlowMo with K simulated workers.

K workers each hold a LeNet-5 copy and optimiser state, draw local batches of B/K from their
own shard of the training split, and average parameters every H local steps (H counts steps,
not epochs); momentum buffers stay local. One epoch is one pass over the training split, as
in the centralised run. In the stacked engine a trial's K copies are K consecutive rows of
each parameter tensor, so P packed trials of K workers are P*K rows stepped together.

SlowMo (Wang et al. 2020), at each averaging with inner lr gamma:
    u <- beta * u + (x_sync - mean_k x_k) / gamma;   x_sync <- x_sync - alpha * gamma * u
beta = 0, alpha = 1 is plain averaging (no outer state is kept then).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold

from trainer.stacked_optim import rows


def shards(labels: np.ndarray, k: int, partition: str, seed: int) -> list[np.ndarray]:
    """Index shards of the training split: label-stratified (iid) or by class (noniid)."""
    if k == 1:
        return [np.arange(len(labels))]
    if partition == "noniid":
        classes = np.unique(labels)
        groups = np.array_split(np.random.default_rng(seed).permutation(classes), k)
        return [np.flatnonzero(np.isin(labels, g)) for g in groups]
    folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return [test for _, test in folds.split(np.zeros(len(labels)), labels)]


def average_plan(steps: list[int], h: int, steps_per_epoch: int, device: torch.device) -> list:
    """Per step of the coming epoch, for trials at `steps` optimiser steps so far: False (no
    trial averages), None (all do) or a (P,) bool mask; built before the steps so that none of
    them copies data to the device."""
    plan: list = []
    masks: dict[tuple[bool, ...], torch.Tensor] = {}
    for s in range(steps_per_epoch):
        due = tuple((step + s + 1) % h == 0 for step in steps)
        if not any(due):
            plan.append(False)
        elif all(due):
            plan.append(None)
        else:
            if due not in masks:
                masks[due] = torch.tensor(due, device=device)
            plan.append(masks[due])
    return plan


def plain(beta: float, alpha: float) -> bool:
    return beta == 0 and alpha == 1


@torch.no_grad()
def average_workers(params: torch.Tensor, k: int, beta: float, alpha: float,
                    inner_lr: torch.Tensor, sync: torch.Tensor | None, u: torch.Tensor | None,
                    due: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Averages each trial's K worker rows of `params` (P*K, ...) in place, with SlowMo's outer
    step unless plain; returns SlowMo's new (sync, u), (P, ...) each (as given when plain).

    inner_lr, due: (P,). `due` selects the trials averaging at this step (None: all). The
    engine passes its whole flat parameter buffer: one chain of ops for the model."""
    view = params.view(-1, k, *params.shape[1:])
    new = view.mean(dim=1)
    if not plain(beta, alpha):
        lr = rows(inner_lr, new)
        new_u = u * beta + (sync - new) / lr
        new = sync - alpha * lr * new_u
        if due is not None:
            new_u = torch.where(rows(due, new), new_u, u)
            new = torch.where(rows(due, new), new, sync)
        sync, u = new, new_u
    spread = new.unsqueeze(1).expand_as(view)
    view.copy_(spread if due is None else torch.where(rows(due, view), spread, view))
    return sync, u
