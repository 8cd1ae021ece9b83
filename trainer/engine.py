"""The stacked engine: one or many trials (each of K local workers) trained as ONE model.

All parameters are one flat (R, N) buffer of R = P*K rows (P trials in the pack, K local
workers per trial; a plain run is P = K = 1), seen by the model as per-tensor views. Each
epoch draws every trial's data order and augmentation uniforms from its own generator; a step
takes each trial's batch, augments all R batches in one pass, runs the rows through the network
(`trainer.networks`: LeNet-5 unless `model` names another; its buffers, e.g. BatchNorm's
statistics, per row too) with `torch.func.vmap` over `functional_call` (CPU: a loop over rows),
backpropagates the sum of the rows' losses (rows are independent, so each gets its own
gradient) and applies the stacked optimiser to the flat buffer, its hyperparameters per-row
tensors. Nothing in an epoch's steps reads a value back to the host; metrics are read once per
epoch. On a GPU a step is launch-bound: benchmarks/launches.py counts its kernels.

Trials join and leave only between epochs (`add`, `remove`, then the next `run_epoch`
restacks); each trial keeps its own generator, epoch, step and round counters, schedule and
optimiser state, so a trial's numbers do not depend on who shares its pack. `state(member)`
is a trial's checkpoint, the same whether it ran packed or alone; `add(config, resume=state)`
continues it in any pack.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from trainer.augment import Augment, prepare_eval
from trainer.config import CHECKPOINT_FORMAT, TrainConfig, pack_key
from trainer.divergence import Diverged, divergence
from trainer.local import average_plan, average_workers, plain, shards
from trainer.networks import args_key, build, initial_state, packable
from trainer.runtime import Setup, autocast
from trainer.schedule import lr_at
from trainer.stacked_optim import HYPER, Layout, StackedOptimizer

EVAL_BATCH = 1024
# stop(steps run, steps left in the epoch, seconds so far) -> stop now?
StopRule = Callable[[int, int, float], bool]


@dataclass(eq=False)
class Member:
    """One trial in the engine: its settings, random stream and progress."""

    config: TrainConfig
    generator: torch.Generator
    epoch: int = 0  # epochs done
    step: int = 0  # optimiser steps done (local methods average every H of them)
    rounds: int = 0  # communication rounds done (local methods)
    history: list[dict[str, Any]] = field(default_factory=list)
    pending: dict[str, Any] | None = None  # tensors to stack in at the next epoch
    row: int | None = None  # index among the stacked trials, once stacked
    partial: dict[str, Any] | None = None  # where a stopped epoch stands (see run_epoch)


class Engine:
    """Trials sharing `setup` (one dataset, device and shape: see `config.pack_key`)."""

    def __init__(self, setup: Setup):
        c = setup.config
        self.setup, self.key = setup, pack_key(c)
        self.k, self.h = c.local_workers, c.local_steps
        self.local = self.k > 1 or self.h > 1
        self.beta, self.alpha = c.slowmo_beta, c.slowmo_lr
        self.model = build(c.model, setup.num_classes, c.model_args).to(setup.device)  # a template
        self.layout = Layout({n: tuple(p.shape) for n, p in self.model.named_parameters()},
                             setup.device)
        # per-row buffers (BatchNorm's statistics), (R, ...) each, updated in place by the rows
        self.buffers: dict[str, torch.Tensor] = {}
        # The accelerator path: vmap runs the rows as one batched (grouped-conv) model, one
        # launch per op for the whole pack, and nothing in a step waits for the device. On the
        # CPU, compute-bound, a loop over the rows with channels_last convolutions is ~1.5x
        # faster than grouped ones (benchmarks/pack.py) and a host sync costs nothing.
        # benchmarks/launches.py and tests/test_sync_guard.py force it on the CPU.
        self.accelerated = setup.device.type != "cpu"
        # rows that cannot run batched (an op without a vmap rule) run one after another
        self.unbatched = (packable(self.model, tuple(setup.train.x.shape[1:]))
                          if self.accelerated and c.model != "lenet5" else None)
        # a user's network may draw (Dropout): each row, run alone, from its trial's seed, epoch
        # and step, so its numbers do not depend on its pack-mates (LeNet-5 draws nothing)
        self.seeded = c.model != "lenet5"
        self.rng_devices = [setup.device] if setup.device.type == "cuda" else []
        self.reseed = torch.cuda.manual_seed if self.rng_devices else torch.default_generator.manual_seed
        self.augment = Augment(c.augment)
        labels = setup.train.y.cpu().numpy()
        self.worker_idx = [torch.as_tensor(s, device=setup.device)
                           for s in shards(labels, self.k, c.local_partition, c.split_seed)]
        self.shortest = min(len(s) for s in self.worker_idx)
        self.local_batch = c.batch_size // self.k
        self.steps_per_epoch = math.ceil(self.shortest / self.local_batch)
        self.members: list[Member] = []
        # all rows' parameters as one (R, N) buffer: the optimiser and local averaging step it
        # in a few kernels; `params` are its per-tensor views (leaves the forward pass uses)
        self.flat = torch.zeros(0, self.layout.size, device=setup.device)
        self.params: dict[str, torch.Tensor] = {}
        self.optimizer: StackedOptimizer | None = None
        self.sync: torch.Tensor | None = None  # SlowMo's (P, N) outer state, when kept
        self.u: torch.Tensor | None = None
        self._restack_needed = False

    # --- membership ---

    def add(self, config: TrainConfig, resume: dict[str, Any] | None = None) -> Member:
        """A trial joins at the next epoch; `resume` is a checkpoint from `state`."""
        if pack_key(config) != self.key:
            raise ValueError("this trial's shape settings differ from the pack's (see pack_key)")
        gen = torch.Generator(device=self.setup.device)
        gen.manual_seed(config.seed)
        member = Member(config, gen)
        if resume is None:
            member.pending = self._fresh(config)
        else:
            if resume.get("format") != CHECKPOINT_FORMAT:
                raise ValueError("checkpoint from another version of the trainer")
            member.pending = {k: resume[k] for k in ("params", "optimizer", "slowmo_sync",
                                                     "slowmo_u")}
            member.pending["buffers"] = resume.get("buffers", {})  # none in LeNet-5's
            gen.set_state(resume["generator"])
            member.epoch, member.step = int(resume["epoch"]), int(resume["step"])
            member.rounds, member.history = int(resume["rounds"]), list(resume["history"])
            member.partial = resume.get("partial")
            if member.partial is not None and self.members:
                raise ValueError("a trial resuming inside an epoch trains alone until its end")
        self.members.append(member)
        self._restack_needed = True
        return member

    def remove(self, member: Member) -> None:
        """The trial leaves (pruned, finished, failed); the others go on at the next epoch."""
        for m in self.members:
            if m.pending is None and m is not member:
                m.pending = self._tensors(m.row)  # views; restacking copies them
        self.members.remove(member)
        self._restack_needed = True

    def _fresh(self, config: TrainConfig) -> dict[str, Any]:
        init, buffers = initial_state(config.model, args_key(config.model_args), config.seed,
                                      self.setup.num_classes)  # shared: read only
        dev, k = self.setup.device, self.k
        # views of the fresh model's tensors (K workers start alike): restacking copies them
        params = {n: p.to(dev).unsqueeze(0).expand(k, *p.shape) for n, p in init.items()}
        keep_outer = self.local and not plain(self.beta, self.alpha)
        return {
            "params": params,
            "buffers": {n: b.to(dev).unsqueeze(0).expand(k, *b.shape) for n, b in buffers.items()},
            "optimizer": None,  # zeros, made where the pack is restacked (not once per trial)
            "slowmo_sync": {n: p[0].clone() for n, p in params.items()} if keep_outer else {},
            "slowmo_u": {n: torch.zeros_like(p[0]) for n, p in params.items()} if keep_outer else {},
        }

    def _tensors(self, row: int) -> dict[str, Any]:
        rows, views = slice(row * self.k, (row + 1) * self.k), self.layout.views

        def outer(flat):
            return {} if flat is None else {n: t[0] for n, t in views(flat[row:row + 1]).items()}

        return {"params": views(self.flat[rows]), "optimizer": self.optimizer.state_rows(rows),
                "buffers": {n: b[rows] for n, b in self.buffers.items()},
                "slowmo_sync": outer(self.sync), "slowmo_u": outer(self.u)}

    def _restack(self) -> None:
        dev = self.setup.device
        states = [m.pending if m.pending is not None else self._tensors(m.row)
                  for m in self.members]
        flatten = self.layout.flatten
        self.flat = torch.cat([flatten(s["params"]).detach().to(dev) for s in states])
        self.params = {n: v.requires_grad_() for n, v in self.layout.views(self.flat).items()}
        self.buffers = {n: torch.cat([s["buffers"][n].to(dev) for s in states])
                        for n, _ in self.model.named_buffers()}

        def outer(key):  # per trial (P, N), or None when no trial keeps SlowMo's state
            if not states[0][key]:
                return None
            return torch.cat([flatten({n: t.unsqueeze(0) for n, t in s[key].items()}).to(dev)
                              for s in states])

        self.sync, self.u = outer("slowmo_sync"), outer("slowmo_u")
        self.optimizer = StackedOptimizer(self.setup.config.optimizer, self.layout,
                                          0, self._per_row())  # its rows: load_rows
        self.optimizer.load_rows([s["optimizer"] for s in states], self.k)
        for i, m in enumerate(self.members):
            m.row, m.pending = i, None
        self._restack_needed = False

    def _per_row(self) -> dict[str, torch.Tensor]:
        """{hyperparameter: (R,) tensor} of the members' settings, repeated over K workers
        (`lr` is set from each trial's schedule at every epoch)."""
        names = [n for n in HYPER[self.setup.config.optimizer] if n != "lr"]
        return {name: torch.tensor([float(getattr(m.config, name)) for m in self.members
                                    for _ in range(self.k)], device=self.setup.device,
                                   dtype=torch.float64)
                for name in names}

    def state(self, member: Member) -> dict[str, Any]:
        """The trial's checkpoint after its last epoch: tensors (copied) and plain data."""
        tensors = member.pending if member.pending is not None else self._tensors(member.row)
        if tensors["optimizer"] is None:  # a fresh trial not trained yet: zero state
            tensors = {**tensors, "optimizer": StackedOptimizer(
                member.config.optimizer, self.layout, self.k, {}).state_rows(slice(None))}

        def copy(tree):
            if isinstance(tree, dict):
                return {k: copy(v) for k, v in tree.items()}
            return tree.detach().clone()

        out = {"format": CHECKPOINT_FORMAT, "epoch": member.epoch, "step": member.step,
               "rounds": member.rounds, "history": list(member.history),
               "generator": member.generator.get_state(), **copy(tensors)}
        if member.partial is not None:  # stopped inside an epoch: where, for a bit-exact resume
            out["partial"] = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                              for k, v in member.partial.items()}
        return out

    # --- one epoch of every member ---

    def _loss(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
              x: torch.Tensor, y: torch.Tensor):
        with autocast(self.setup.device, self.setup.precision):
            logits = functional_call(self.model, {**params, **buffers}, (x,))
        return F.cross_entropy(logits.float(), y), logits

    def _forward(self, x: torch.Tensor, y: torch.Tensor, streams: list[tuple] | None = None,
                 step: int = 0):
        """Per-row mean losses (R,) and logits (R, b, classes). With `streams` (a row's seed,
        epoch, worker), rows run one after another draw random ops from their own at `step`."""
        if self.accelerated and len(x) > 1 and self.unbatched is None:
            # random ops (Dropout) draw differently per row
            return vmap(self._loss, randomness="different")(self.params, self.buffers, x, y)
        # unbind: its backward stacks the rows' gradients in one op (indexing would not)
        rows = {n: p.unbind(0) for n, p in self.params.items()}
        out = []
        for i in range(len(x)):
            with contextlib.ExitStack() as own:
                if streams is not None:  # random ops draw from this row's own stream
                    own.enter_context(torch.random.fork_rng(self.rng_devices))
                    self.reseed(hash((*streams[i], step)) & (2**63 - 1))
                out.append(self._loss({n: r[i] for n, r in rows.items()},
                                      {n: b[i] for n, b in self.buffers.items()},
                                      x[i].contiguous(memory_format=torch.channels_last), y[i]))
        return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])

    def run_epoch(self, stop: StopRule | None = None
                  ) -> list[tuple[Member, dict[str, Any] | None, Diverged | None]]:
        """Trains every member for one epoch and evaluates it; returns (member, metrics,
        error) per member, error being Diverged for a trial whose loss blew up.

        `stop(steps_done, steps_in_epoch, seconds)` is asked after every step (a host-side
        flag, no device sync); when it says so the epoch stops there and returns [], each
        member's `partial` holding the epoch's position (data order seed, generator,
        accumulated loss and accuracy) so that `state` and a resume continue it bit for bit."""
        if not self.members:
            return []
        if self._restack_needed:
            self._restack()
        members, setup, dev = self.members, self.setup, self.setup.device
        p_count, k = len(members), self.k
        lrs = [lr_at(m.config, m.epoch) for m in members]
        self.optimizer.hyper["lr"] = torch.tensor([lr for lr in lrs for _ in range(k)], device=dev,
                                                  dtype=torch.float64)
        inner_lr = torch.tensor(lrs, device=dev)
        plan = average_plan([m.step for m in members], self.h, self.steps_per_epoch,
                            dev) if self.local else []
        start = time.perf_counter()
        resumed = members[0].partial if p_count == 1 else None
        loss_sum, correct, stopped_at, order = self.train_steps(inner_lr, plan, stop, resumed)
        if resumed is not None:
            start -= resumed["seconds"]
            members[0].partial = None
        if stopped_at is not None:
            seconds = time.perf_counter() - start
            for i, m in enumerate(members):
                rows = slice(i * k, (i + 1) * k)
                m.partial = {"at_step": stopped_at, "order_generator": order[i],
                             "loss_sum": loss_sum[rows], "correct": correct[rows],
                             "seconds": seconds}
            return []
        seen = k * self.shortest
        train_loss = loss_sum.view(p_count, k).sum(1).div(seen).tolist()  # the epoch's one sync
        train_acc = correct.view(p_count, k).sum(1).div(seen).tolist()
        seconds = time.perf_counter() - start
        val_loss, val_acc = self.evaluate(setup.val)
        out = []
        for i, m in enumerate(members):
            if self.local:
                m.rounds += sum(1 for s in range(self.steps_per_epoch)
                                if (m.step + s + 1) % self.h == 0)
            m.step += self.steps_per_epoch
            m.epoch += 1
            error = divergence(m.config, m.epoch, train_loss[i], setup.num_classes)
            if error is not None:
                out.append((m, None, error))
                continue
            metrics: dict[str, Any] = {
                "epoch": m.epoch, "train_loss": train_loss[i], "train_acc": train_acc[i],
                "val_loss": val_loss[i], "val_acc": val_acc[i], "lr": lrs[i],
                "seconds": seconds, "images_per_s": seen / seconds, "step": m.step}
            if self.local:
                metrics["comm_rounds"] = m.rounds
            m.history.append(metrics)
            out.append((m, metrics, None))
        return out

    def train_steps(self, inner_lr: torch.Tensor, plan: list[Any], stop: StopRule | None = None,
                    resumed: dict[str, Any] | None = None):
        """One epoch's steps for every row (from a stopped epoch's position when `resumed`);
        returns the rows' (loss sums, correct counts) as device tensors, the step it stopped
        after (None: the epoch ran out) and each member's generator state before its data
        order was drawn. Nothing here waits for the device (tests/test_gpu.py checks)."""
        members, setup, dev = self.members, self.setup, self.setup.device
        k, p_count = self.k, len(self.members)
        r_count = p_count * k
        if resumed is not None:  # the epoch's data order and draws again, from where they began
            members[0].generator.set_state(resumed["order_generator"])
        order = [m.generator.get_state() for m in members]
        perms = torch.stack([
            torch.stack([s[torch.randperm(len(s), generator=m.generator, device=dev)][:self.shortest]
                         for s in self.worker_idx])
            for m in members])  # (P, K, shortest)
        # the whole epoch's augmentation, drawn and planned at once per trial (P, K*shortest,
        # D): a step slices its rows (K*lo .. K*hi) and launches only the passes over images
        size = setup.train.x.shape[-1]
        plans = torch.stack([self.augment.plan(self.augment.draw(k * self.shortest, m.generator),
                                               size, self.accelerated) for m in members])
        streams = ([(m.config.seed, m.epoch, j) for m in members for j in range(k)]
                   if self.seeded else None)
        loss_sum = torch.zeros(r_count, device=dev)
        correct = torch.zeros(r_count, device=dev, dtype=torch.long)
        first = 0
        if resumed is not None:
            first = int(resumed["at_step"])
            loss_sum += resumed["loss_sum"].to(dev)
            correct += resumed["correct"].to(dev)
        shape = setup.train.x.shape[1:]
        self.model.train()  # BatchNorm on batch statistics, Dropout on
        began = time.perf_counter()
        for s in range(first, self.steps_per_epoch):
            lo, hi = s * self.local_batch, min((s + 1) * self.local_batch, self.shortest)
            b = hi - lo
            idx = perms[:, :, lo:hi].reshape(-1)
            augment = plans[:, k * lo:k * hi].reshape(r_count * b, -1)
            x = self.augment.apply_plan(setup.train.x[idx], augment, self.accelerated)
            x = x.view(r_count, b, *shape)
            y = setup.train.y[idx].view(r_count, b)
            losses, logits = self._forward(x, y, streams, s)
            losses.sum().backward()
            grads = self.layout.flatten({n: p.grad for n, p in self.params.items()})
            for p in self.params.values():
                p.grad = None
            self.optimizer.step(self.flat, grads)
            if self.local and plan[s] is not False:
                self.sync, self.u = average_workers(self.flat, k, self.beta, self.alpha, inner_lr,
                                                    self.sync, self.u, plan[s])
            loss_sum += losses.detach() * b
            correct += (logits.detach().argmax(-1) == y).sum(-1)
            done = s + 1
            if (stop is not None and done < self.steps_per_epoch
                    and stop(done - first, self.steps_per_epoch - done, time.perf_counter() - began)):
                return loss_sum, correct, done, order
        return loss_sum, correct, None, order

    @torch.no_grad()
    def evaluate(self, split) -> tuple[list[float], list[float]]:
        """(mean losses, accuracies) per member over a split; a trial's K workers are
        evaluated as their average."""
        p_count, dev, k = len(self.members), self.setup.device, self.k

        def per_trial(t: torch.Tensor) -> torch.Tensor:  # K workers' rows as their average
            if k == 1:
                return t.detach()
            rows = t.view(p_count, k, *t.shape[1:])
            return rows.mean(1) if t.is_floating_point() else rows[:, 0]

        params = {n: per_trial(t) for n, t in {**self.params, **self.buffers}.items()}
        self.model.eval()  # BatchNorm on each trial's running statistics, Dropout off
        loss_sum = torch.zeros(p_count, device=dev)
        correct = torch.zeros(p_count, device=dev, dtype=torch.long)
        chunk = max(128, EVAL_BATCH // p_count)  # bounds activation memory for big packs
        for i in range(0, len(split), chunk):
            x = prepare_eval(split.x[i:i + chunk]).contiguous(memory_format=torch.channels_last)
            y = split.y[i:i + chunk]
            with autocast(dev, self.setup.precision):
                if self.accelerated and p_count > 1 and self.unbatched is None:
                    logits = vmap(functional_call, in_dims=(None, 0, None))(self.model, params, (x,))
                else:
                    logits = torch.stack([
                        functional_call(self.model, {n: p[i] for n, p in params.items()}, (x,))
                        for i in range(p_count)])
            logits = logits.float()
            loss_sum += F.cross_entropy(logits.flatten(0, 1), y.repeat(p_count),
                                        reduction="none").view(p_count, -1).sum(1)
            correct += (logits.argmax(-1) == y).sum(-1)
        n = max(len(split), 1)
        return (loss_sum / n).tolist(), (correct.double() / n).tolist()
