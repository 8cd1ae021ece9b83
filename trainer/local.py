"""Local methods (Step 3 of the notes): LocalSGD and SlowMo with K simulated workers.

K workers each hold a LeNet-5 copy and optimiser state, draw local batches of B/K from their
own shard of the training split, and average parameters every H local steps (H counts steps,
not epochs); momentum buffers stay local. One epoch is one pass over the training split, as
in the centralised run. The K copies live stacked in one tensor per parameter and step as one
batched computation (`torch.func.vmap` over `functional_call`), not a Python loop over models.

SlowMo (Wang et al. 2020), at each averaging with inner lr gamma:
    u <- beta * u + (x_sync - mean_k x_k) / gamma;   x_sync <- x_sync - alpha * gamma * u
beta = 0, alpha = 1 is plain averaging.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import StratifiedKFold
from torch.func import functional_call, grad_and_value, vmap

from trainer.augment import Augment
from trainer.loop import (
    CheckpointCallback,
    EpochCallback,
    Setup,
    TrainResult,
    autocast,
    check_divergence,
    evaluate,
    set_lr,
)
from trainer.model import LeNet5
from trainer.optim import build_optimizer
from trainer.schedule import lr_at


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


class SlowMo:
    """Outer step applied at each averaging; holds the synced point and the outer momentum."""

    def __init__(self, params: dict[str, torch.Tensor], beta: float, alpha: float):
        self.beta, self.alpha = beta, alpha
        self.sync = {n: p[0].detach().clone() for n, p in params.items()}
        self.u = {n: torch.zeros_like(p) for n, p in self.sync.items()}

    @torch.no_grad()
    def step(self, params: dict[str, torch.Tensor], inner_lr: float) -> None:
        """Averages the K copies in place (with the SlowMo outer update) and broadcasts."""
        for name, stacked in params.items():
            avg = stacked.mean(dim=0)
            if self.beta == 0 and self.alpha == 1:
                new = avg
            else:
                u = self.u[name]
                u.mul_(self.beta).add_((self.sync[name] - avg) / inner_lr)
                new = self.sync[name] - self.alpha * inner_lr * u
            self.sync[name] = new.clone()
            stacked.copy_(new.expand_as(stacked))


def train_local(setup: Setup, on_epoch: EpochCallback | None = None,
                resume: dict[str, Any] | None = None,
                on_checkpoint: CheckpointCallback | None = None) -> TrainResult:
    """The local-methods loop; `resume` / `on_checkpoint` as in `trainer.train`."""
    config, device, precision, gen = setup.config, setup.device, setup.precision, setup.generator
    k, h = config.local_workers, config.local_steps
    local_batch = config.batch_size // k
    model = LeNet5(setup.num_classes).to(device)
    # every worker starts from the same point (the centralised run's initialisation)
    params = {n: p.detach().unsqueeze(0).repeat(k, *[1] * p.ndim).requires_grad_()
              for n, p in model.named_parameters()}
    optimizer = build_optimizer(config, list(params.values()), lr_at(config, 0), batch_dims=1)
    outer = SlowMo(params, config.slowmo_beta, config.slowmo_lr)
    augment = Augment(config.augment, gen)
    labels = setup.train.y.cpu().numpy()
    worker_idx = [torch.as_tensor(s, device=device)
                  for s in shards(labels, k, config.local_partition, config.split_seed)]
    shortest = min(len(s) for s in worker_idx)
    steps_per_epoch = math.ceil(shortest / local_batch)

    def loss_fn(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
        with autocast(device, precision):
            logits = functional_call(model, p, (x,))
        loss = F.cross_entropy(logits.float(), y)
        return loss, logits

    worker_step = vmap(grad_and_value(loss_fn, has_aux=True))
    result, step, rounds, first = TrainResult(), 0, 0, 0
    if resume is not None:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(resume["params"][name])
        optimizer.load_state_dict(resume["optimizer"])
        outer.sync, outer.u = dict(resume["slowmo_sync"]), dict(resume["slowmo_u"])
        gen.set_state(resume["generator"])
        torch.set_rng_state(resume["rng_cpu"])
        result.history = list(resume["history"])
        first, step, rounds = int(resume["epoch"]), int(resume["step"]), int(resume["rounds"])
    eval_model = LeNet5(setup.num_classes).to(device, memory_format=torch.channels_last)
    for epoch in range(first, config.epochs):
        lr = set_lr(optimizer, config, epoch)
        start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        perms = [s[torch.randperm(len(s), generator=gen, device=device)] for s in worker_idx]
        for s in range(steps_per_epoch):
            lo, hi = s * local_batch, min((s + 1) * local_batch, shortest)
            idx = torch.stack([p[lo:hi] for p in perms])  # (K, b)
            x = augment(setup.train.x[idx.flatten()]).reshape(k, hi - lo, *setup.train.x.shape[1:])
            y = setup.train.y[idx]
            grads, (losses, logits) = worker_step(params, x, y)
            for name, p in params.items():
                p.grad = grads[name]
            optimizer.step()
            step += 1
            if step % h == 0:
                outer.step(params, lr)
                rounds += 1
            loss_sum += losses.detach().sum() * (hi - lo)
            correct += (logits.detach().argmax(-1) == y).sum()
            seen += k * (hi - lo)
        train_loss = loss_sum.item() / seen
        check_divergence(config, epoch + 1, train_loss, setup.num_classes)
        seconds = time.perf_counter() - start
        with torch.no_grad():  # evaluate the average of the workers' models
            for name, p in eval_model.named_parameters():
                p.copy_(params[name].mean(dim=0))
        val_loss, val_acc = evaluate(eval_model, setup.val, device, precision)
        metrics: dict[str, Any] = {
            "epoch": epoch + 1, "train_loss": train_loss, "train_acc": correct.item() / seen,
            "val_loss": val_loss, "val_acc": val_acc, "lr": lr, "seconds": seconds,
            "images_per_s": seen / seconds, "comm_rounds": rounds,
        }
        result.history.append(metrics)
        if on_epoch is not None and on_epoch(metrics):
            result.stopped_early = True
            break
        if on_checkpoint is not None:
            on_checkpoint({"epoch": epoch + 1, "step": step, "rounds": rounds,
                           "params": {n: p.detach() for n, p in params.items()},
                           "optimizer": optimizer.state_dict(), "slowmo_sync": outer.sync,
                           "slowmo_u": outer.u, "generator": gen.get_state(),
                           "rng_cpu": torch.get_rng_state(), "history": result.history})
    return result
