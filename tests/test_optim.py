"""simprop.train.optim.SGD makes torch.optim.SGD's updates bit for bit, and shares its state format."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from simprop.train.optim import SGD


def _network(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 1))
    net.add_module("unused", torch.nn.Linear(2, 2))  # never gets a gradient: must stay untouched
    return net


def _train(net: torch.nn.Module, optimizer, steps: range, lrs=None) -> list[float]:
    gen = torch.Generator().manual_seed(11)
    losses = []
    for step in steps:
        x = torch.randn(4, 3, 9, 9, generator=gen)
        y = (x[:, 0] > 0).long()  # learnable: the sign of the first channel
        if lrs is not None:
            optimizer.param_groups[0]["lr"] = lrs(step)
        loss = torch.nn.functional.cross_entropy(net[:3](x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("lrs", [None, lambda step: 0.05 * (1 - step / 40) ** 0.9], ids=["constant", "poly"])
def test_updates_equal_torch_sgd_bit_for_bit(lrs):
    ours, theirs = _network(0), _network(0)
    kwargs = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
    a = _train(ours, SGD(ours.parameters(), **kwargs), range(30), lrs)
    b = _train(theirs, torch.optim.SGD(theirs.parameters(), **kwargs), range(30), lrs)
    assert a == b
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(p, q), name
    assert torch.equal(ours.unused.weight, _network(0).unused.weight)  # no gradient: no decay either
    assert a[-1] < a[0]  # and it trains


def test_state_dicts_load_both_ways_and_resume_the_same_trajectory():
    kwargs = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
    reference = _network(1)
    ref_opt = torch.optim.SGD(reference.parameters(), **kwargs)
    _train(reference, ref_opt, range(20))

    # torch's state -> ours, resumed for 10 steps, equals torch continuing
    ours = _network(1)
    ours.load_state_dict(reference.state_dict())
    opt = SGD(ours.parameters(), lr=1.0)  # hyperparameters come from the state
    opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))  # as read back from last.pt
    assert opt.param_groups[0]["lr"] == 0.05 and opt.param_groups[0]["momentum"] == 0.9
    _train(ours, opt, range(20, 30))
    _train(reference, ref_opt, range(20, 30))
    for p, q in zip(ours.parameters(), reference.parameters()):
        assert torch.equal(p, q)

    # ours -> torch
    again = _network(2)
    again.load_state_dict(ours.state_dict())
    torch_opt = torch.optim.SGD(again.parameters(), lr=1.0, momentum=0.9, weight_decay=5e-4)
    torch_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    _train(again, torch_opt, range(30, 35))
    _train(ours, opt, range(30, 35))
    for p, q in zip(ours.parameters(), again.parameters()):
        assert torch.equal(p, q)


def test_a_state_of_another_network_or_bad_hyperparameters_are_refused():
    net = _network(0)
    opt = SGD(net.parameters(), lr=0.1, momentum=0.9)
    other = SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="another network"):
        opt.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="lr must be a finite number"):
        SGD(net.parameters(), lr=float("nan"))
    with pytest.raises(ValueError, match="empty parameter list"):
        SGD([], lr=0.1)


def test_the_trainer_does_not_import_torch_dynamo():
    """The reason the class exists: building the optimizer (and a GradScaler) imports no dynamo."""
    code = (
        "import sys, torch\n"
        "from simprop.train.optim import SGD\n"
        "net = torch.nn.Linear(3, 2)\n"
        "opt = SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)\n"
        "scaler = torch.amp.GradScaler('cpu', enabled=False)\n"
        "loss = net(torch.randn(4, 3)).sum(); opt.zero_grad(); scaler.scale(loss).backward(); scaler.step(opt)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_parameter_groups_take_their_own_learning_rate_as_torch_sgd_does():
    ours, theirs = _network(2), _network(2)
    kwargs = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)

    def groups(net):
        return [{"params": net[0].parameters(), "lr_scale": 1.0}, {"params": net[2].parameters(), "lr": 0.005}]

    opt_a, opt_b = SGD(groups(ours), **kwargs), torch.optim.SGD(groups(theirs), **kwargs)
    assert [g["lr"] for g in opt_a.param_groups] == [0.05, 0.005]
    assert opt_a.param_groups[0]["lr_scale"] == 1.0  # extra keys kept, as torch keeps them
    assert _train(ours, opt_a, range(20)) == _train(theirs, opt_b, range(20))
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(p, q), name
    restored = SGD(groups(_network(2)), lr=1.0)
    restored.load_state_dict(opt_b.state_dict())
    assert [g["lr"] for g in restored.param_groups] == [0.05, 0.005]
    with pytest.raises(ValueError, match="without parameters"):
        SGD([{"params": []}], lr=0.1)
