"""Optimisers over stacked parameters: R rows (packed trials, or a trial's local workers, or
both) of the whole model as ONE flat (R, N) buffer, and every hyperparameter an (R,) tensor on
the device, so rows with different lr / betas / momentum / weight decay step together and a
step is a dozen or two kernels whatever the number of parameter tensors (on a GPU a LeNet-5
step is launch-bound: benchmarks/launches.py).

The steps follow torch's AdamW and SGD (single-tensor formulas, the per-row scalars such as
bias corrections computed in float64 as torch computes them in Python) and our LARS and LAMB
(`trainer.optim`), row by row; `tests/test_pack.py` checks each against those references.
LARS / LAMB trust ratios are per row and per parameter tensor (segment norms over the flat
buffer). "Adapted" tensors are those with more than one dimension per row: biases get neither
weight decay nor trust scaling in LARS and LAMB, as in the single-trial classes.
"""

from __future__ import annotations

import math
from functools import cached_property

import torch

# per-row hyperparameters each optimiser reads (names are TrainConfig fields)
HYPER = {
    "adamw": ("lr", "momentum", "beta2", "weight_decay"),
    "sgdm": ("lr", "momentum", "weight_decay"),
    "lars": ("lr", "momentum", "weight_decay", "trust_coefficient"),
    "lamb": ("lr", "momentum", "beta2", "weight_decay", "lamb_clamp"),
}
BUFFERS = {"adamw": ("exp_avg", "exp_avg_sq"), "sgdm": ("momentum_buffer",),
           "lars": ("momentum_buffer",), "lamb": ("exp_avg", "exp_avg_sq")}
EPS = {"adamw": 1e-8, "sgdm": 0.0, "lars": 1e-8, "lamb": 1e-6}


def rows(h: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """An (R,) tensor shaped to broadcast against an (R, ...) one."""
    return h.view(-1, *([1] * (like.ndim - 1)))


class Layout:
    """Where each named parameter tensor lives in a flat (R, N) buffer: `flatten` packs a
    {name: (R, *shape)} dict into one, `views` gives the dict back as views of it."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], device: torch.device | str = "cpu"):
        self.shapes, self.device = dict(shapes), torch.device(device)
        self.sizes = [math.prod(s) for s in self.shapes.values()]
        self.size = sum(self.sizes)
        # adapted (LARS / LAMB): more than one dimension per row
        self.adapted = torch.tensor([len(s) > 1 for s in self.shapes.values()], device=device)

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor]) -> Layout:
        """The layout of a dict of (R, ...) tensors."""
        some = next(iter(tensors.values()))
        return cls({n: tuple(t.shape[1:]) for n, t in tensors.items()}, some.device)

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[n].reshape(len(tensors[n]), -1) for n in self.shapes], 1)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.shapes, (part.view(len(flat), *shape) for part, shape in zip(
            flat.split(self.sizes, 1), self.shapes.values(), strict=True)), strict=True))

    @cached_property
    def segment(self) -> torch.Tensor:
        """(N,) index of the tensor each flat element belongs to."""
        return torch.repeat_interleave(torch.arange(len(self.sizes), device=self.device),
                                       torch.tensor(self.sizes, device=self.device))

    @cached_property
    def adapted_elements(self) -> torch.Tensor:
        """(N,) 1.0 where the element's tensor is adapted, else 0.0."""
        return self.adapted.float()[self.segment]

    def segment_norms(self, flat: torch.Tensor) -> torch.Tensor:
        """(R, L): the norm of each row's part of each tensor."""
        sums = torch.zeros(len(flat), len(self.sizes), device=flat.device, dtype=flat.dtype)
        return sums.index_add_(1, self.segment, flat.square()).sqrt_()


class StackedOptimizer:
    """`step(params, grads)` updates every row of a flat (R, N) parameter buffer in place.

    `hyper[name]` are (R,) float tensors, settable between steps (the schedule writes `lr`
    each epoch); `steps` counts each row's own steps (rows may join a pack later)."""

    def __init__(self, name: str, layout: Layout, row_count: int, hyper: dict[str, torch.Tensor]):
        if name not in HYPER:
            raise ValueError(f"optimizer: unknown {name!r}")
        self.name, self.layout = name, layout
        self.hyper = {k: hyper[k] for k in HYPER[name] if k in hyper}
        dev = layout.device
        self.steps = torch.zeros(row_count, device=dev)
        self.buffers = {b: torch.zeros(row_count, layout.size, device=dev) for b in BUFFERS[name]}

    def _h(self, name: str) -> torch.Tensor:
        """A hyperparameter as an (R, 1) float64 column (per-row scalars are computed in float64,
        as torch computes them in Python, then cast once)."""
        return self.hyper[name].double().view(-1, 1)

    @torch.no_grad()
    def step(self, p: torch.Tensor, g: torch.Tensor) -> None:
        """p, g: (R, N) parameters (updated in place) and their gradients."""
        self.steps += 1
        f32 = torch.float32
        lr, wd = self._h("lr"), self._h("weight_decay")
        layout, name = self.layout, self.name
        if name == "adamw":
            m, v = self.buffers["exp_avg"], self.buffers["exp_avg_sq"]
            beta1, beta2, t = self._h("momentum"), self._h("beta2"), self.steps.double().view(-1, 1)
            p.mul_((1 - lr * wd).to(f32))
            m.lerp_(g, (1 - beta1).to(f32))
            v.mul_(beta2.to(f32)).addcmul_(g, g * (1 - beta2).to(f32))
            denom = (v.sqrt() / (1 - beta2 ** t).sqrt().to(f32)).add_(EPS["adamw"])
            p.sub_(m / denom * (lr / (1 - beta1 ** t)).to(f32))
        elif name == "sgdm":
            buf = self.buffers["momentum_buffer"]
            buf.mul_(self._h("momentum").to(f32)).add_(g.add(p * wd.to(f32)))
            p.sub_(buf * lr.to(f32))
        elif name == "lars":
            buf = self.buffers["momentum_buffer"]
            w_norm, g_norm = layout.segment_norms(p), layout.segment_norms(g)
            wd32 = wd.to(f32)
            trust = torch.where(layout.adapted & (w_norm > 0) & (g_norm > 0),
                                self._h("trust_coefficient").to(f32) * w_norm
                                / (g_norm + wd32 * w_norm + EPS["lars"]), 1.0)
            d = (g + p * (wd32 * layout.adapted_elements)).mul_(trust[:, layout.segment])
            buf.mul_(self._h("momentum").to(f32)).add_(d * lr.to(f32))
            p.sub_(buf)
        else:  # lamb
            m, v = self.buffers["exp_avg"], self.buffers["exp_avg_sq"]
            beta1, beta2, t = self._h("momentum"), self._h("beta2"), self.steps.double().view(-1, 1)
            m.mul_(beta1.to(f32)).add_(g * (1 - beta1).to(f32))
            v.mul_(beta2.to(f32)).addcmul_(g, g * (1 - beta2).to(f32))
            r = (m / (1 - beta1 ** t).to(f32)) / ((v / (1 - beta2 ** t).to(f32)).sqrt() + EPS["lamb"])
            r.add_(p * (wd.to(f32) * layout.adapted_elements))
            w_norm = torch.minimum(layout.segment_norms(p), self._h("lamb_clamp").to(f32))
            r_norm = layout.segment_norms(r)
            trust = torch.where(layout.adapted & (w_norm > 0) & (r_norm > 0), w_norm / r_norm, 1.0)
            p.sub_(r.mul_(trust[:, layout.segment]) * lr.to(f32))

    def state_rows(self, index: slice) -> dict:
        """The optimiser state of some rows (views), in the per-trial checkpoint layout:
        {"steps": (r,), "buffers": {buffer: {parameter name: (r, *shape)}}}."""
        return {"steps": self.steps[index],
                "buffers": {b: self.layout.views(flat[index]) for b, flat in self.buffers.items()}}

    def load_rows(self, states: list[dict | None], k: int = 1) -> None:
        """Replaces the whole state by stacking per-trial states (as `state_rows` gives them;
        None: a fresh trial's `k` zero rows)."""
        dev, size = self.layout.device, self.layout.size
        self.steps = torch.cat([torch.zeros(k, device=dev) if s is None else s["steps"].to(dev)
                                for s in states])
        for b in self.buffers:
            self.buffers[b] = torch.cat([torch.zeros(k, size, device=dev) if s is None
                                         else self.layout.flatten(s["buffers"][b]).to(dev)
                                         for s in states])
