"""Optimizers: SGD with Nesterov momentum (default), LARS, AdamW.

Weight decay is not applied to biases and BatchNorm parameters (1-d tensors).
"""
from __future__ import annotations

import torch
from torch import nn

OPTIMIZERS = ("sgd", "lars", "adamw")


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017) on top of SGD with momentum.

    Parameter groups with ``lars=False`` (biases, norms) take plain SGD steps.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps, lars=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if g["weight_decay"]:
                    d = d.add(p, alpha=g["weight_decay"])
                if g["lars"]:
                    pn, dn = torch.norm(p), torch.norm(d)
                    trust = torch.where((pn > 0) & (dn > 0), g["trust_coefficient"] * pn / (dn + g["eps"]),
                                        torch.ones_like(pn))
                    d = d.mul(trust)
                st = self.state[p]
                buf = st.get("momentum_buffer")
                if buf is None:
                    buf = st["momentum_buffer"] = d.clone()
                else:
                    buf.mul_(g["momentum"]).add_(d)
                p.add_(buf, alpha=-g["lr"])
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights with decay, biases/norm parameters without (and without LARS scaling)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0, "lars": False}]


def build_optimizer(name: str, model: nn.Module, lr: float, momentum: float = 0.9,
                    weight_decay: float = 5e-4) -> torch.optim.Optimizer:
    """Build optimizer ``name`` (sgd | lars | adamw) for ``model``."""
    groups = param_groups(model, weight_decay)
    if name == "sgd":
        for g in groups:
            g.pop("lars", None)
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        for g in groups:
            g.pop("lars", None)
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


def scale_weight_decay(opt: torch.optim.Optimizer, factor: float) -> None:
    """Set every group's weight decay to its base value times ``factor`` (the base is kept
    in the group as ``base_weight_decay``, so it travels with the optimizer's state dict).

    Why: a loss weight ``w`` scales the gradient but not the decay, so with BatchNorm
    (scale-invariant weights) it changes the weight norm rather than the effective step;
    scaling the decay by the batch's weight as well makes the weight a true step size
    (SGD with momentum: the same update as the learning rate times ``w``)."""
    for g in opt.param_groups:
        base = g.setdefault("base_weight_decay", g["weight_decay"])
        g["weight_decay"] = base * factor
