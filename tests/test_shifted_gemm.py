"""The encoder conv as one matrix product + shifted adds is the same function as conv2d."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from simprop.model import shifted_gemm
from simprop.model.encoder import FeatureProjection
from simprop.model.shifted_gemm import (
    ShiftedGemmConv2d,
    _ShiftedGemmConv,
    shifted_gemm_conv3x3,
)

# (batch, in channels, height, width, out channels, dilation): the default setup's projection,
# maps smaller than the dilation (taps entirely in the padding), non-square maps, dilation 1
SHAPES = [(16, 1536, 9, 9, 16, 2), (2, 7, 1, 3, 5, 2), (3, 4, 3, 2, 2, 4), (2, 5, 6, 7, 3, 1)]


@pytest.mark.parametrize("n,c,h,w,o,d", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_values_and_gradients_equal_conv2d_in_fp32(n, c, h, w, o, d, channels_last):
    torch.manual_seed(0)
    conv = ShiftedGemmConv2d(c, o, dilation=d, kernel="shifted_gemm")
    x = torch.randn(n, c, h, w)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    grad_out = torch.randn(n, o, h, w)

    out = conv(x)
    out.backward(grad_out)
    ours = (out.detach(), x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone())
    x.grad = conv.weight.grad = conv.bias.grad = None
    reference = F.conv2d(x, conv.weight, conv.bias, padding=d, dilation=d)
    reference.backward(grad_out)
    expected = (reference.detach(), x.grad, conv.weight.grad, conv.bias.grad)

    assert out.is_contiguous()  # the layers after it get the usual NCHW layout
    for name, a, b in zip(("output", "input grad", "weight grad", "bias grad"), ours, expected):
        scale = max(1.0, b.abs().max().item())  # sums over up to 1536*9*1296 terms: relative
        assert (a - b).abs().max().item() <= 1e-5 * scale, name


@pytest.mark.parametrize("n,c,h,w,o,d", [(2, 3, 4, 5, 2, 2), (1, 2, 2, 3, 3, 3), (2, 4, 3, 3, 2, 1)])
def test_gradcheck_in_float64(n, c, h, w, o, d):
    torch.manual_seed(1)
    x = torch.randn(n, c, h, w, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(o, c, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(o, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, e: _ShiftedGemmConv.apply(a, b, e, d), (x, weight, bias))


def test_without_bias_and_with_frozen_input():
    torch.manual_seed(2)
    conv = ShiftedGemmConv2d(6, 4, dilation=2, bias=False)
    x = torch.randn(3, 6, 5, 5)  # cached features: no gradient wanted
    conv(x).square().sum().backward()
    ours = conv.weight.grad.clone()
    conv.weight.grad = None
    F.conv2d(x, conv.weight, None, padding=2, dilation=2).square().sum().backward()
    assert torch.allclose(ours, conv.weight.grad, rtol=1e-5, atol=1e-5)
    assert x.grad is None


def test_falls_back_to_conv2d_outside_cpu_float32():
    torch.manual_seed(3)
    conv = ShiftedGemmConv2d(4, 3, dilation=2).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=2, dilation=2))


def test_rejects_a_kernel_that_is_not_3x3():
    with pytest.raises(ValueError, match="3x3 kernel"):
        shifted_gemm_conv3x3(torch.randn(1, 2, 4, 4), torch.randn(3, 2, 5, 5), None, 1)


def test_projection_keeps_the_state_dict_of_a_plain_conv():
    """Checkpoints written before (``projection.0`` an ``nn.Conv2d``) load unchanged."""
    plain = torch.nn.Sequential(torch.nn.Conv2d(8, 4, 3, padding=2, dilation=2), torch.nn.ReLU(), torch.nn.Dropout2d(0.1))
    projection = FeatureProjection(8, 4, dropout=0.1)
    projection.load_state_dict(plain.state_dict(), strict=True)
    x = torch.randn(2, 8, 9, 9)
    assert torch.allclose(projection.eval()(x), plain.eval()(x), atol=1e-6)


# --------------------------------------------------------------------------- the form chosen at run time (issue 29)


@pytest.fixture
def fresh_choices():
    """Each test starts and ends without measured choices or a log (they live for the process)."""
    shifted_gemm.clear_kernel_choices()
    yield
    shifted_gemm.clear_kernel_choices()


@pytest.mark.parametrize("n,c,h,w,o,d", SHAPES)
def test_every_kernel_setting_gives_the_same_values_and_gradients(n, c, h, w, o, d, fresh_choices):
    """model.conv_kernel pins a form or measures: the same function up to float rounding, and the
    log names the form each setting ran and why."""
    torch.manual_seed(4)
    x = torch.randn(n, c, h, w)
    grad_out = torch.randn(n, o, h, w)
    results, how = {}, {}
    for kernel in ("conv2d", "shifted_gemm", "auto"):
        torch.manual_seed(5)
        conv = ShiftedGemmConv2d(c, o, dilation=d, kernel=kernel)
        xi = x.clone().requires_grad_()
        out = conv(xi)
        out.backward(grad_out)
        results[kernel] = (out.detach(), xi.grad, conv.weight.grad, conv.bias.grad)
        how[kernel] = shifted_gemm.kernels_used()
        shifted_gemm.clear_kernel_choices()
    for kernel in ("shifted_gemm", "auto"):
        for name, a, b in zip(("output", "input grad", "weight grad", "bias grad"), results[kernel], results["conv2d"]):
            assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item()), (kernel, name)
    problem = f"{n}x{c}x{h}x{w}->{o} d{d} float32 cpu {torch.get_num_threads()}t train"
    assert how["conv2d"] == {problem: {"kernel": "conv2d", "how": "pinned"}}
    assert how["shifted_gemm"] == {problem: {"kernel": "shifted_gemm", "how": "pinned"}}
    measured = how["auto"][problem]
    assert measured["how"] == "measured" and set(measured["ms"]) == {"shifted_gemm", "conv2d"}
    assert measured["kernel"] == min(measured["ms"], key=measured["ms"].get)


def _slowed(form, seconds):
    def slow(*args):
        time.sleep(seconds)
        return form(*args)

    return slow


@pytest.mark.parametrize("slow", ["conv2d", "shifted_gemm"])
def test_auto_keeps_the_faster_form_once_per_problem(slow, monkeypatch, fresh_choices):
    """The choice follows the timings (a form made 30 ms slower loses), is measured once per
    problem and process, and a new problem (another batch size, inference) is measured again."""
    calls = {"conv2d": 0, "shifted_gemm": 0}

    def counted(name):
        form = shifted_gemm.FORMS[name]

        def run(*args):
            calls[name] += 1
            return form(*args)

        return run

    for name in calls:
        monkeypatch.setitem(shifted_gemm.FORMS, name, counted(name))
    monkeypatch.setitem(shifted_gemm.FORMS, slow, _slowed(shifted_gemm.FORMS[slow], 0.03))
    faster = "shifted_gemm" if slow == "conv2d" else "conv2d"
    conv = ShiftedGemmConv2d(6, 4, dilation=2, kernel="auto")
    x = torch.randn(2, 6, 5, 5)
    conv(x)
    measured_calls = dict(calls)
    # one warm-up and AUTO_REPS timed calls of each form, then the chosen form for the real call
    assert measured_calls[slow] == 1 + shifted_gemm.AUTO_REPS
    assert measured_calls[faster] == 1 + shifted_gemm.AUTO_REPS + 1
    for _ in range(3):
        conv(x)
    assert calls[slow] == measured_calls[slow] and calls[faster] == measured_calls[faster] + 3  # cached
    with torch.no_grad():
        conv(torch.randn(3, 6, 5, 5))  # another problem: measured again
    assert calls[slow] == measured_calls[slow] + 1 + shifted_gemm.AUTO_REPS
    used = shifted_gemm.kernels_used()
    assert [entry["kernel"] for entry in used.values()] == [faster, faster]
    assert [name.split(" ")[-1] for name in used] == ["train", "infer"]
    assert shifted_gemm.kernels_summary(used) == faster
    assert shifted_gemm.kernel_record("auto") == {"setting": "auto", "used": faster, "problems": used}


def test_measuring_leaves_the_parameters_without_gradient(fresh_choices):
    conv = ShiftedGemmConv2d(6, 4, dilation=2, kernel="auto")
    with torch.no_grad():
        conv(torch.randn(2, 6, 5, 5))
    assert conv.weight.grad is None and conv.bias.grad is None


def test_only_conv2d_runs_outside_cpu_float32(fresh_choices):
    """Float64, and CPU autocast, run conv2d whatever the setting, and the log says why."""
    conv = ShiftedGemmConv2d(4, 3, dilation=2, kernel="shifted_gemm").double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=2, dilation=2))
    conv = ShiftedGemmConv2d(4, 3, dilation=2, kernel="auto")
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        conv(torch.randn(2, 4, 5, 5))
    assert [entry for entry in shifted_gemm.kernels_used().values()] == [{"kernel": "conv2d", "how": "only form"}] * 2
    assert shifted_gemm.kernels_summary() == "conv2d"
    shifted_gemm.clear_kernel_choices()
    assert shifted_gemm.kernels_summary() == "none"


def test_an_unknown_kernel_is_rejected():
    with pytest.raises(ValueError, match="model.conv_kernel"):
        ShiftedGemmConv2d(4, 3, kernel="winograd")


# candidates for a clear winner; which form wins depends on the CPU (the AVX2 EPYC: the first,
# the shifted GEMM, 2.6x; the AVX-512 EPYC: conv2d), so the test finds a clear one first
CLEAR_WIN_CANDIDATES = [(16, 1536, 9, 9, 16, 2, True), (4, 1024, 2, 2, 512, 8, False), (16, 512, 4, 4, 256, 4, True)]
CLEAR_MARGIN = 1.5  # the winner at least 1.5x faster, best of 7, in a measurement of its own


def test_auto_picks_the_faster_form_where_one_clearly_wins(monkeypatch, fresh_choices):
    """The real timings: on a problem where one form is clearly faster (best of 7 interleaved
    calls, >= 1.5x, measured apart from the choice), ``auto`` chooses that form.  Robust on a
    loaded machine: both measurements take the best of several interleaved calls, and only a
    clear margin is asserted."""
    monkeypatch.setattr(shifted_gemm, "AUTO_REPS", 7)
    torch.manual_seed(6)
    for n, c, h, w, o, d, training in CLEAR_WIN_CANDIDATES:
        x = torch.randn(n, c, h, w)
        conv = ShiftedGemmConv2d(c, o, dilation=d, kernel="auto").requires_grad_(training)
        with torch.no_grad():
            conv.weight.mul_(0.01)
        ms = shifted_gemm.time_forms(x, conv.weight, conv.bias, d, training, reps=7)
        winner, loser = sorted(ms, key=ms.get)
        if ms[loser] >= CLEAR_MARGIN * ms[winner]:
            break
    else:
        pytest.skip(f"no clear winner on this machine among {CLEAR_WIN_CANDIDATES}: last {ms}")
    with torch.set_grad_enabled(training):
        conv(x)
    (choice,) = shifted_gemm.kernels_used().values()
    assert choice["kernel"] == winner, f"independent measurement {ms}, auto's {choice['ms']}"
