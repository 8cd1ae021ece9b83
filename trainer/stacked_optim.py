"""Optimisers over stacked parameters: each tensor holds R rows (packed trials, or a trial's
local workers, or both), and every hyperparameter is an (R,) tensor on the device, so rows with
different lr / betas / momentum / weight decay step together in the same kernels.

The steps follow torch's AdamW and SGD (single-tensor, non-foreach formulas) and our LARS and
LAMB (`trainer.optim`) exactly, row by row; `tests/test_stacked_optim.py` checks each against
those references over several steps. Norms (LARS / LAMB trust ratios) are taken per row.
"Adapted" tensors are those with more than one dimension per row: biases get neither weight
decay nor trust scaling in LARS and LAMB, as in the single-trial classes.
"""

from __future__ import annotations

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


def row_norm(t: torch.Tensor) -> torch.Tensor:
    """Norm of each row, shaped to broadcast against t."""
    return rows(torch.linalg.vector_norm(t.flatten(1), dim=1), t)


class StackedOptimizer:
    """`step(params, grads)` updates every row of every tensor in place.

    `hyper[name]` are (R,) float tensors, settable between steps (the schedule writes `lr`
    each epoch); `steps` counts each row's own steps (rows may join a pack later)."""

    def __init__(self, name: str, params: dict[str, torch.Tensor], hyper: dict[str, torch.Tensor]):
        if name not in HYPER:
            raise ValueError(f"optimizer: unknown {name!r}")
        self.name = name
        self.hyper = {k: hyper[k] for k in HYPER[name] if k in hyper}
        some = next(iter(params.values()))
        self.steps = torch.zeros(len(some), device=some.device)
        self.buffers = {b: {n: torch.zeros_like(p) for n, p in params.items()}
                        for b in BUFFERS[name]}

    @torch.no_grad()
    def step(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
        self.steps += 1
        h = self.hyper
        if self.name in ("adamw", "lamb"):
            beta1, beta2 = h["momentum"], h["beta2"]
            bias1 = 1 - beta1 ** self.steps
            bias2 = 1 - beta2 ** self.steps
        for name, p in params.items():
            g = grads[name]
            lr, wd = rows(h["lr"], p), rows(h["weight_decay"], p)
            adapted = p.ndim > 2
            if self.name == "adamw":
                m, v = self.buffers["exp_avg"][name], self.buffers["exp_avg_sq"][name]
                p.mul_(1 - lr * wd)
                m.lerp_(g, 1 - rows(beta1, p))
                v.mul_(rows(beta2, p)).addcmul_(g, g * (1 - rows(beta2, p)))
                denom = (v.sqrt() / rows(bias2, p).sqrt()).add_(EPS["adamw"])
                p.sub_(m / denom * (lr / rows(bias1, p)))
            elif self.name == "sgdm":
                buf = self.buffers["momentum_buffer"][name]
                buf.mul_(rows(h["momentum"], p)).add_(g.add(p * wd))
                p.sub_(buf * lr)
            elif self.name == "lars":
                buf = self.buffers["momentum_buffer"][name]
                if adapted:
                    w_norm, g_norm = row_norm(p), row_norm(g)
                    trust = torch.where((w_norm > 0) & (g_norm > 0),
                                        rows(h["trust_coefficient"], p) * w_norm
                                        / (g_norm + wd * w_norm + EPS["lars"]),
                                        torch.ones_like(w_norm))
                    d = g.add(p * wd).mul_(trust)
                else:
                    d = g
                buf.mul_(rows(h["momentum"], p)).add_(d * lr)
                p.sub_(buf)
            else:  # lamb
                m, v = self.buffers["exp_avg"][name], self.buffers["exp_avg_sq"][name]
                m.mul_(rows(beta1, p)).add_(g * (1 - rows(beta1, p)))
                v.mul_(rows(beta2, p)).addcmul_(g, g * (1 - rows(beta2, p)))
                r = (m / rows(bias1, p)) / ((v / rows(bias2, p)).sqrt() + EPS["lamb"])
                if adapted:
                    r.add_(p * wd)
                    w_norm = torch.minimum(row_norm(p), rows(h["lamb_clamp"], p))
                    r_norm = row_norm(r)
                    r.mul_(torch.where((w_norm > 0) & (r_norm > 0), w_norm / r_norm,
                                       torch.ones_like(w_norm)))
                p.sub_(r * lr)

    def state_rows(self, index: slice) -> dict:
        """The optimiser state of some rows (views), in the per-trial checkpoint layout."""
        return {"steps": self.steps[index],
                "buffers": {b: {n: t[index] for n, t in bufs.items()}
                            for b, bufs in self.buffers.items()}}

    def load_rows(self, states: list[dict]) -> None:
        """Replaces the whole state by stacking per-trial states (as `state_rows` gives them)."""
        self.steps = torch.cat([s["steps"].to(self.steps.device) for s in states])
        for b, bufs in self.buffers.items():
            for n in bufs:
                bufs[n] = torch.cat([s["buffers"][b][n].to(self.steps.device) for s in states])
