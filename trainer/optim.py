"""LARS (You et al. 2017) and LAMB (You et al. 2019) as single-model torch optimisers: the
reference the stacked optimisers (`trainer.stacked_optim`) are tested against.

"Adapted" tensors are those with ndim > 1: biases and other 1-D tensors get neither weight
decay nor trust scaling unless `exclude_1d=False`.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer


def _adapted(p: torch.Tensor, exclude_1d: bool, batch_dims: int = 0) -> bool:
    return p.ndim - batch_dims > 1 or not exclude_1d


def _norm(t: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """Norm of the whole tensor, or per leading index when it stacks several models' copies
    (local SGD keeps K workers' parameters in one tensor); shaped to broadcast against t."""
    if batch_dims == 0:
        return torch.linalg.vector_norm(t)
    norms = torch.linalg.vector_norm(t.flatten(batch_dims), dim=-1)
    return norms.reshape(*norms.shape, *([1] * (t.ndim - batch_dims)))


class LARS(Optimizer):
    """d = g + wd*w; trust = eta*||w|| / (||g|| + wd*||w|| + eps); buf = m*buf + lr*trust*d;
    w -= buf. Trust is 1 where a norm is zero and for non-adapted tensors (which use d = g)."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8, exclude_1d: bool = True,
                 batch_dims: int = 0):
        if lr <= 0:
            raise ValueError(f"lr: expected > 0, got {lr}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps, exclude_1d=exclude_1d,
                        batch_dims=batch_dims)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, eta, eps = group["weight_decay"], group["trust_coefficient"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                bd = group["batch_dims"]
                if _adapted(p, group["exclude_1d"], bd):
                    w_norm, g_norm = _norm(p, bd), _norm(g, bd)
                    d = g.add(p, alpha=wd)
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0),
                        eta * w_norm / (g_norm + wd * w_norm + eps),
                        torch.ones_like(w_norm),
                    )
                    d.mul_(trust)
                else:
                    d = g.clone()
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(d, alpha=group["lr"])
                p.sub_(buf)
        return loss


class LAMB(Optimizer):
    """Adam moments with bias correction; r = m_hat/(sqrt(v_hat)+eps) + wd*w (adapted only);
    trust = clip(||w||, clamp)/||r|| for adapted tensors with both norms > 0, else 1;
    w -= lr*trust*r."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0,
                 clamp: tuple[float, float] = (0.0, 10.0), exclude_1d: bool = True,
                 batch_dims: int = 0):
        if lr <= 0:
            raise ValueError(f"lr: expected > 0, got {lr}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, clamp=clamp,
                        exclude_1d=exclude_1d, batch_dims=batch_dims)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lo, hi = group["clamp"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                m_hat = m / (1 - beta1**t)
                v_hat = v / (1 - beta2**t)
                r = m_hat / (v_hat.sqrt() + group["eps"])
                bd = group["batch_dims"]
                if _adapted(p, group["exclude_1d"], bd):
                    r.add_(p, alpha=group["weight_decay"])
                    w_norm = _norm(p, bd).clamp(lo, hi)
                    r_norm = _norm(r, bd)
                    trust = torch.where((w_norm > 0) & (r_norm > 0), w_norm / r_norm,
                                        torch.ones_like(w_norm))
                    r.mul_(trust)
                p.sub_(r, alpha=group["lr"])
        return loss
