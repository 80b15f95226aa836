"""SGD with momentum and weight decay: the update ``torch.optim.SGD`` makes, without its import cost.

Why not ``torch.optim.SGD`` itself: every ``torch.optim`` optimizer wraps its methods in
``torch._disable_dynamo``, so constructing one imports ``torch._dynamo``, a start-up cost of every
training process that never compiles anything (measured: docs/performance.md, "Measurements
behind code choices").

The update is the one of ``torch/optim/sgd.py`` ``_single_tensor_sgd`` (the path torch takes
for CPU tensors; CANet's ``train.py`` and PFENet's ``train.py`` train with ``torch.optim.SGD``),
with nesterov off and ``maximize`` off, as the trainer uses it::

    g = grad + weight_decay * p
    b = g (first step), else b = momentum * b + (1 - dampening) * g
    p = p - lr * b

``tests/test_optim.py`` checks the parameters match ``torch.optim.SGD`` bit for bit over many
steps (constant and changing learning rate, parameters without gradients) and that the two
load each other's ``state_dict`` (the same format: ``{"state": {index: {"momentum_buffer":
tensor}}, "param_groups": [{..., "params": [indices]}]}``). ``torch.amp.GradScaler`` drives it
like any optimizer: it reads ``param_groups`` and calls :meth:`SGD.step`.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor


class SGD:
    """Stochastic gradient descent with momentum and (L2) weight decay.

    ``params`` is a list of tensors (one parameter group) or, as with ``torch.optim``, a list
    of dicts, one group each (the trainer's ``train.projection_lr_scale`` group). Each group's
    ``"lr"`` may be changed between steps (the trainer's learning-rate schedule does).
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0) -> None:  # fmt: skip
        for name, value in (("lr", lr), ("momentum", momentum), ("dampening", dampening), ("weight_decay", weight_decay)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"SGD: {name} must be a finite number >= 0, got {value!r}")
        params = list(params)
        if not params:
            raise ValueError("SGD got an empty parameter list (no trainable parameters)")
        # As torch.optim: a list of tensors is one group; a list of dicts is one group each, whose
        # own keys (e.g. "lr") override the defaults and whose extra keys are kept
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        defaults = {"lr": float(lr), "momentum": float(momentum), "dampening": float(dampening),
                    "weight_decay": float(weight_decay), "nesterov": False, "maximize": False}  # fmt: skip
        self.param_groups: list[dict[str, Any]] = []
        for group in groups:
            tensors = list(group["params"])
            if not tensors:
                raise ValueError("SGD got a parameter group without parameters")
            self.param_groups.append({**defaults, **group, "params": tensors})
        self.state: dict[Tensor, dict[str, Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_()
                    p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient (the others are left as they are)."""
        for group in self.param_groups:
            lr, momentum, dampening, decay = group["lr"], group["momentum"], group["dampening"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if decay != 0:
                    grad = grad.add(p, alpha=decay)
                if momentum != 0:
                    state = self.state.setdefault(p, {})
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = grad.detach().clone()
                    else:
                        buf.mul_(momentum).add_(grad, alpha=1 - dampening)
                    grad = buf
                p.add_(grad, alpha=-lr)

    # ------------------------------------------------------------------ state (torch.optim's format)

    def state_dict(self) -> dict[str, Any]:
        index = {p: n for n, p in enumerate(p for g in self.param_groups for p in g["params"])}
        return {
            "state": {index[p]: dict(s) for p, s in self.state.items() if p in index},
            "param_groups": [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[p] for p in g["params"]]}
                             for g in self.param_groups],  # fmt: skip
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore hyperparameters and momentum buffers saved by this class or ``torch.optim.SGD``."""
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise ValueError("optimizer state has a different number of parameter groups than this optimizer")
        for saved, group in zip(groups, self.param_groups):
            if len(saved.get("params", ())) != len(group["params"]):
                raise ValueError(
                    f"optimizer state holds {len(saved.get('params', ()))} parameters, this optimizer "
                    f"{len(group['params'])}: it belongs to another network"
                )
            if saved.get("nesterov") or saved.get("maximize"):
                raise ValueError("optimizer state uses nesterov or maximize, which simprop.train.optim.SGD does not implement")
        state = {}
        for saved, group in zip(groups, self.param_groups):
            group.update({k: saved[k] for k in ("lr", "momentum", "dampening", "weight_decay") if k in saved})
            for saved_id, p in zip(saved["params"], group["params"]):
                buf = state_dict.get("state", {}).get(saved_id, {}).get("momentum_buffer")
                if buf is not None:
                    state[p] = {"momentum_buffer": buf.to(device=p.device, dtype=p.dtype).clone()}
        self.state = state


POLY_POWER = 0.9  # PFENet util/util.py poly_learning_rate (and DeepLab): lr * (1 - it / max_it) ** 0.9


def learning_rate(base_lr: float, schedule: str, step: int, total_steps: int) -> float:
    """``train.lr_schedule``: ``constant`` (CANet's train.py) or ``poly`` (PFENet's
    ``poly_learning_rate``: ``base_lr * (1 - step / total_steps) ** 0.9``)."""
    if schedule == "constant":
        return base_lr
    return base_lr * (1.0 - min(step, total_steps) / total_steps) ** POLY_POWER


def parameter_groups(model, projection_lr_scale: float) -> list[dict]:
    """The optimizer's parameter groups: every trainable parameter at ``train.lr``, except the
    encoder's projection (1536 -> ``model.channels``, ReLU) at ``train.lr * train.projection_lr_scale``
    when that scale is not 1.

    Why a separate rate: the projection reads the frozen backbone's ReLU features, non-negative
    with a large common mean, so at the head's rate one SGD step moves a unit's pre-activation the
    same way at every pixel and can push whole units below zero everywhere, where ReLU passes no
    gradient to revive them; at the default setup's lr 0.05 projection channels died
    (docs/studies/2026-11-27-projection-lr-scale.md; docs/architecture.md, "Dead projection
    channels"). CANet's ``train.py`` uses one rate (2.5e-3 with 256 channels); the paper setup
    keeps that (scale 1).

    Scale 0 freezes the projection at its seeded initialisation: its parameters stop requiring
    gradients and are left out of the optimizer (so weight decay cannot shrink them either), and
    the trainer feeds the network its cached outputs (:class:`EncodedFeatures`).
    """
    if projection_lr_scale == 1.0:
        return [{"params": model.trainable_parameters()}]
    projection = list(model.projection.parameters())
    ids = {id(p) for p in projection}
    head = [p for p in model.trainable_parameters() if id(p) not in ids]
    if projection_lr_scale == 0.0:
        for p in projection:
            p.requires_grad_(False)
        return [{"params": head}]
    return [{"params": head, "lr_scale": 1.0}, {"params": projection, "lr_scale": float(projection_lr_scale)}]
