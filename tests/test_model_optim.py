"""LeNet-5's shape and size, and LARS / LAMB against their formulas computed by hand."""

import math

import torch

from trainer.model import LeNet5
from trainer.optim import LAMB, LARS


def test_lenet5_matches_hsu_et_al():
    model = LeNet5(100)
    assert sum(p.numel() for p in model.parameters()) == 815_332
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


def _grads(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(3, 4, generator=g), torch.randn(4, generator=g)


def _params():
    g = torch.Generator().manual_seed(7)
    return torch.randn(3, 4, generator=g), torch.randn(4, generator=g)


def test_lars_follows_you_et_al_2017():
    lr, mom, wd, eta, eps = 0.5, 0.9, 1e-2, 1e-3, 1e-8
    w0, b0 = _params()
    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    opt = LARS([w, b], lr=lr, momentum=mom, weight_decay=wd, trust_coefficient=eta, eps=eps)
    hw, hb = w0.clone(), b0.clone()
    buf_w, buf_b = torch.zeros_like(hw), torch.zeros_like(hb)
    for step in range(4):
        gw, gb = _grads(step)
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        # by hand: the 2-D weight is adapted, the 1-D bias is not
        wn, gn = hw.norm().item(), gw.norm().item()
        trust = eta * wn / (gn + wd * wn + eps)
        buf_w = mom * buf_w + lr * trust * (gw + wd * hw)
        hw = hw - buf_w
        buf_b = mom * buf_b + lr * gb
        hb = hb - buf_b
        torch.testing.assert_close(w.detach(), hw, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.detach(), hb, rtol=1e-5, atol=1e-6)


def test_lars_trust_is_one_for_zero_weights_and_adapts_1d_when_asked():
    w = torch.zeros(2, 2, requires_grad=True)
    opt = LARS([w], lr=0.1, momentum=0.0)
    w.grad = torch.ones(2, 2)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((2, 2), -0.1))
    b = torch.ones(4, requires_grad=True)
    opt = LARS([b], lr=1.0, momentum=0.0, trust_coefficient=0.01, exclude_1d=False)
    b.grad = torch.full((4,), 2.0)
    opt.step()  # trust = 0.01 * 2 / 4 = 0.005, step = 0.005 * 2
    torch.testing.assert_close(b.detach(), torch.full((4,), 1 - 0.01))


def test_lamb_follows_you_et_al_2019():
    lr, b1, b2, eps, wd, hi = 0.01, 0.9, 0.999, 1e-6, 0.1, 10.0
    w0, b0 = _params()
    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    opt = LAMB([w, b], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, clamp=(0.0, hi))
    hw, hb = w0.clone(), b0.clone()
    mw, vw, mb, vb = (torch.zeros_like(hw), torch.zeros_like(hw), torch.zeros_like(hb),
                      torch.zeros_like(hb))
    for t in range(1, 5):
        gw, gb = _grads(t)
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        mw, vw = b1 * mw + (1 - b1) * gw, b2 * vw + (1 - b2) * gw**2
        mb, vb = b1 * mb + (1 - b1) * gb, b2 * vb + (1 - b2) * gb**2
        rw = (mw / (1 - b1**t)) / ((vw / (1 - b2**t)).sqrt() + eps) + wd * hw
        trust = min(max(hw.norm().item(), 0.0), hi) / rw.norm().item()
        hw = hw - lr * trust * rw
        rb = (mb / (1 - b1**t)) / ((vb / (1 - b2**t)).sqrt() + eps)  # 1-D: no wd, no trust
        hb = hb - lr * rb
        torch.testing.assert_close(w.detach(), hw, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.detach(), hb, rtol=1e-5, atol=1e-6)


def test_lamb_clamps_weight_norm():
    w = torch.full((2, 2), 100.0, requires_grad=True)  # ||w|| = 200, clamped to 10
    opt = LAMB([w], lr=0.1, clamp=(0.0, 10.0))
    w.grad = torch.ones(2, 2)
    opt.step()
    # first step: m_hat = g, v_hat = g^2, r = 1/(1+eps) per element, ||r|| ~ 2, trust = 10/2
    r = 1 / (1 + 1e-6)
    expected = 100.0 - 0.1 * (10.0 / (2 * r)) * r
    torch.testing.assert_close(w.detach(), torch.full((2, 2), expected))
    assert math.isfinite(expected)
