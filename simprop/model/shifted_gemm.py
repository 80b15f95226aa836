"""The encoder's dilated 3x3 convolution as one matrix product and nine shifted adds.

A 3x3 convolution with dilation ``d`` and "same" zero padding sums, over its nine taps
``(i, j)``, a 1x1 convolution of the input shifted by ``((i-1)d, (j-1)d)``::

    out[n, o, y, x] = b[o] + Σ_ij Σ_c W[o, c, i, j] · in[n, c, y + (i-1)d, x + (j-1)d]

so all nine 1x1 convolutions are one product of the input pixels ``[N·H·W, C]`` with the
stacked tap weights ``[C, 9·O]``, after which each tap's ``O`` columns are added to the output
shifted by their offset (the "kn2row" form of a convolution).  The weight gradient is likewise
one product of the shifted output gradients with the same input matrix.

Why: the shared encoder conv (1536 -> ``model.channels``, paper §3.2) on the default setup's
9 x 9 cached feature maps was a large share of every training step, and oneDNN's dilated
direct convolution is memory-bound there (an im2col copy would be 9x the input).  This form reads
the input once per pass; with channels-last input (the feature cache stores NHWC rows,
:mod:`simprop.engine.features`) the input matrix is a view, no copy.  Measured with
``python3 benchmarks/bench_train_step.py``: docs/performance.md, "The default training step".

It is the same function as ``torch.nn.functional.conv2d`` up to float summation order
(``tests/test_shifted_gemm.py``: fp32 values and gradients against ``conv2d``, and
``gradcheck`` in float64).  :class:`ShiftedGemmConv2d` can use it on the CPU in float32 outside
autocast only; on CUDA, under autocast or in other dtypes it calls ``conv2d`` as before
(cuDNN's implicit GEMM already avoids the copy, and this form is not measured there).

**Which form runs is chosen where it runs** (``model.conv_kernel``, issue 29).  The shifted
GEMM was chosen on a 2-core AVX2 EPYC, where oneDNN's dilated direct convolution was 2.6x
slower on the default setup's maps; on an AVX-512 EPYC with native bf16 oneDNN's ``conv2d``
is the faster one (16x1536x9x9 -> 16: 4.5 vs 8.5 ms; the paper's 16x1536x41x41 -> 256:
1.4-1.5 vs 2.2 s, forward + backward, 2 threads).  So ``auto`` times both forms once per
process on the first call of each (input shape, weight shape, dilation, dtype, device, torch
threads, training or not) and keeps the faster, as ``torch.backends.cudnn.benchmark`` does for
cuDNN's algorithms (PyTorch's ``torch/backends/cudnn/__init__.py``: a cache of measured choices
keyed by the problem, for the life of the process).  ``shifted_gemm`` and ``conv2d`` pin a
form: the measured choice can flip between two runs on one machine when the two are close, and
the default setup's training amplifies float rounding, so its committed run pins the form it
used.  Every form that ran is logged (:func:`kernels_used`) for the run's tags and metrics.

Not done for the other hand-written forms (docs/architecture.md):
:func:`~simprop.model.prototype_conv.conv_with_tiled_prototype` and
:class:`~simprop.model.decoder.DilatedConv2d` do not replace the library's convolution, they
call ``conv2d`` on a smaller problem (half the input channels; the taps that read only padding
dropped), so every machine's ``conv2d`` gets the same or less arithmetic to do.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _tap_windows(height: int, width: int, dilation: int) -> Iterator[tuple[int, tuple[slice, slice], tuple[slice, slice]]]:
    """For each tap ``k = 3i + j``: the output window and the input window it reads.

    Output pixel ``y`` reads input row ``y + dy`` (``dy = (i-1)d``) where that is inside the
    map; rows whose partner falls in the zero padding get nothing from this tap.
    """

    def window(length: int, offset: int) -> tuple[slice, slice]:
        # output rows y with 0 <= y + offset < length, and the input rows y + offset
        lo, hi = max(0, -offset), min(length, length - offset)
        hi = max(lo, hi)  # empty when the offset is at least the length
        return slice(lo, hi), slice(lo + offset, hi + offset)

    for i in range(3):
        out_rows, in_rows = window(height, (i - 1) * dilation)
        for j in range(3):
            out_cols, in_cols = window(width, (j - 1) * dilation)
            yield 3 * i + j, (out_rows, out_cols), (in_rows, in_cols)


class _ShiftedGemmConv(torch.autograd.Function):
    """Autograd of the shifted-GEMM convolution (input, weight and bias gradients)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, dilation: int) -> Tensor:
        n, c, h, w = x.shape
        o = weight.shape[0]
        pixels = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view for channels-last input
        taps = weight.permute(2, 3, 0, 1).reshape(9 * o, c)  # row 3i+j block: W[:, :, i, j]
        per_tap = (pixels @ taps.t()).view(n, h, w, 9, o)
        out = x.new_zeros(n, h, w, o) if bias is None else bias.expand(n, h, w, o).clone()
        for k, (oy, ox), (iy, ix) in _tap_windows(h, w, dilation):
            out[:, oy, ox] += per_tap[:, iy, ix, k]
        ctx.save_for_backward(pixels, taps)
        ctx.geometry = (n, c, h, w, o, dilation, bias is not None)
        # the rest of the network sees the usual contiguous NCHW layout
        return out.permute(0, 3, 1, 2).contiguous()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        pixels, taps = ctx.saved_tensors
        n, c, h, w, o, dilation, has_bias = ctx.geometry
        grad = grad_out.permute(0, 2, 3, 1)  # [n, h, w, o]
        # d(per_tap)[:, in window, k] = grad[:, out window]: the forward's scatter, reversed
        grad_taps = grad.new_zeros(n, h, w, 9, o)
        for k, (oy, ox), (iy, ix) in _tap_windows(h, w, dilation):
            grad_taps[:, iy, ix, k] = grad[:, oy, ox]
        grad_taps = grad_taps.view(n * h * w, 9 * o)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_taps @ taps).view(n, h, w, c).permute(0, 3, 1, 2)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_taps.t() @ pixels).view(3, 3, o, c).permute(2, 3, 0, 1)
        if has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(dim=(0, 1, 2))
        return grad_x, grad_weight, grad_bias, None


def shifted_gemm_conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None, dilation: int) -> Tensor:
    """``conv2d(x, weight, bias, padding=dilation, dilation=dilation)`` for a 3x3 ``weight``."""
    if weight.shape[2:] != (3, 3) or x.dim() != 4 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"shifted_gemm_conv3x3: needs a 3x3 kernel over the input's channels, got "
                         f"input {tuple(x.shape)} and weight {tuple(weight.shape)}")  # fmt: skip
    return _ShiftedGemmConv.apply(x, weight, bias, dilation)


KERNELS = ("shifted_gemm", "conv2d")  # the forms; model.conv_kernel also takes "auto"
AUTO_REPS = 3  # timed calls per form, best of them, after one untimed warm-up call each


def _conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, dilation: int) -> Tensor:
    # contiguous NCHW as the shifted GEMM returns it (oneDNN keeps a channels-last input's layout), so
    # that the layers after the conv see the same layout whichever form ran
    return F.conv2d(x, weight, bias, padding=dilation, dilation=dilation).contiguous()


FORMS: dict[str, Callable[[Tensor, Tensor, Tensor | None, int], Tensor]] = {
    "shifted_gemm": shifted_gemm_conv3x3,
    "conv2d": _conv2d,
}


@dataclass(frozen=True)
class KernelChoice:
    """The form one problem ran with: ``how`` is ``measured`` (``auto``; ``ms``: each form's best
    time), ``pinned`` (``model.conv_kernel`` named it) or ``only form`` (not CPU float32 outside
    autocast: only ``conv2d`` applies)."""

    kernel: str
    how: str
    ms: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kernel": self.kernel, "how": self.how}
        if self.ms is not None:
            out["ms"] = dict(self.ms)
        return out


ONLY_CONV2D = KernelChoice("conv2d", "only form")
PINNED = {kernel: KernelChoice(kernel, "pinned") for kernel in KERNELS}
# auto's measured choices, keyed by the problem, for the life of the process (cudnn.benchmark's rule)
_MEASURED: dict[tuple, KernelChoice] = {}
# every (problem, form) that ran in this process, and why that form
_USED: dict[tuple[tuple, str], KernelChoice] = {}


def _problem(x: Tensor, weight: Tensor, dilation: int, training: bool) -> tuple:
    return (tuple(x.shape), tuple(weight.shape), dilation, str(x.dtype).removeprefix("torch."), str(x.device),
            torch.get_num_threads(), training)  # fmt: skip


def describe_problem(problem: tuple) -> str:
    """``16x1536x9x9->16 d2 float32 cpu 2t train``: a problem key as one line."""
    shape, weight, dilation, dtype, device, threads, training = problem
    return (f"{'x'.join(map(str, shape))}->{weight[0]} d{dilation} {dtype} {device} {threads}t "
            f"{'train' if training else 'infer'}")  # fmt: skip


def time_forms(x: Tensor, weight: Tensor, bias: Tensor | None, dilation: int, training: bool,
               reps: int = AUTO_REPS, forms: dict[str, Callable] | None = None) -> dict[str, float]:  # fmt: skip
    """Best-of-``reps`` milliseconds of each form on these tensors (forward, plus backward when
    ``training``), the forms interleaved so that a burst of load elsewhere hits both alike.

    Runs on detached copies: the module's parameters get no gradient and no autograd graph is kept.
    """
    forms = FORMS if forms is None else forms
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    needs = (x.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)

    def call(form: Callable) -> None:
        xi = x.detach().requires_grad_(needs[0])
        wi = weight.detach().requires_grad_(needs[1])
        bi = None if bias is None else bias.detach().requires_grad_(needs[2])
        with torch.enable_grad() if training else torch.no_grad():
            out = form(xi, wi, bi, dilation)
            if training:
                out.backward(torch.ones_like(out))
        sync()

    best = {name: float("inf") for name in forms}
    for name, form in forms.items():  # warm-up: oneDNN's primitive creation, allocator growth
        call(form)
    for _ in range(max(1, reps)):
        for name, form in forms.items():
            start = time.perf_counter()
            call(form)
            best[name] = min(best[name], (time.perf_counter() - start) * 1000.0)
    return best


def choose_kernel(x: Tensor, weight: Tensor, bias: Tensor | None, dilation: int, training: bool) -> KernelChoice:
    """``auto``: the faster form for this problem, measured on its first call in this process and
    cached (``conv2d``, the library's kernel, unless the shifted GEMM is strictly faster)."""
    return _choose(_problem(x, weight, dilation, training), x, weight, bias, dilation, training)


def _choose(problem: tuple, x: Tensor, weight: Tensor, bias: Tensor | None, dilation: int, training: bool) -> KernelChoice:
    choice = _MEASURED.get(problem)
    if choice is None:
        ms = time_forms(x, weight, bias, dilation, training)
        kernel = "shifted_gemm" if ms["shifted_gemm"] < ms["conv2d"] else "conv2d"
        choice = _MEASURED[problem] = KernelChoice(kernel, "measured", {k: round(v, 3) for k, v in ms.items()})
    return choice


def kernels_used() -> dict[str, dict[str, Any]]:
    """Every problem a :class:`ShiftedGemmConv2d` ran in this process (:func:`describe_problem`)
    -> the form it ran with and why (:class:`KernelChoice`), for a run's metrics file.  A worker
    process runs several trainings: the log covers the process so far, which includes e.g. the
    frozen projection's outputs that an earlier training of the fold computed for this one."""
    problems = [problem for problem, _ in _USED]
    out = {}
    for (problem, kernel), choice in _USED.items():
        name = describe_problem(problem)
        out[name if problems.count(problem) == 1 else f"{name} [{kernel}]"] = choice.to_dict()
    return out


def kernels_summary(used: dict[str, dict[str, Any]] | None = None) -> str:
    """The forms that ran, sorted and comma-joined (``shifted_gemm``, ``conv2d,shifted_gemm``),
    ``none`` when the conv did not run: the run's ``conv_kernel_used`` tag."""
    used = kernels_used() if used is None else used
    return ",".join(sorted({entry["kernel"] for entry in used.values()})) or "none"


def kernel_record(setting: str) -> dict[str, Any]:
    """A run's ``conv_kernel`` metrics entry: the module's ``setting`` (``model.conv_kernel``), the
    forms used (:func:`kernels_summary`, its ``conv_kernel_used`` tag) and per problem the form
    and why (:func:`kernels_used`; ``auto``'s timings in ms)."""
    used = kernels_used()
    return {"setting": setting, "used": kernels_summary(used), "problems": used}


def clear_kernel_choices() -> None:
    """Forget the measured choices and the log (tests; a process that changed its thread count
    gets new problem keys anyway)."""
    _MEASURED.clear()
    _USED.clear()


class ShiftedGemmConv2d(nn.Conv2d):
    """A 3x3, stride-1, "same"-padded (``padding = dilation``) ``nn.Conv2d`` (same parameters
    and state-dict keys) that can run as :func:`shifted_gemm_conv3x3` on the CPU in float32.

    ``kernel`` (``model.conv_kernel``): ``auto`` measures both forms per problem
    (:func:`choose_kernel`), ``shifted_gemm`` / ``conv2d`` pin one.  Outside CPU float32 without
    autocast only ``conv2d`` applies, whatever the setting.
    """

    def __init__(self, in_channels: int, out_channels: int, dilation: int = 1, bias: bool = True,
                 kernel: str = "auto") -> None:  # fmt: skip
        super().__init__(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=bias)
        self.kernel = kernel

    @property
    def kernel(self) -> str:
        return self._kernel

    @kernel.setter
    def kernel(self, value: str) -> None:
        if value != "auto" and value not in KERNELS:
            raise ValueError(f"conv kernel {value!r}: use auto, {' or '.join(KERNELS)} (model.conv_kernel)")
        self._kernel = value

    def forward(self, x: Tensor) -> Tensor:
        dilation = self.dilation[0]
        training = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        problem = _problem(x, self.weight, dilation, training)
        if (
            x.device.type != "cpu"
            or x.dtype != torch.float32
            or self.weight.dtype != torch.float32
            or torch.is_autocast_enabled("cpu")
        ):
            _USED.setdefault((problem, "conv2d"), ONLY_CONV2D)
            return F.conv2d(x, self.weight, self.bias, padding=self.padding, dilation=self.dilation)  # as before
        if self.kernel == "auto":
            choice = _choose(problem, x, self.weight, self.bias, dilation, training)
        else:
            choice = PINNED[self.kernel]
        _USED.setdefault((problem, choice.kernel), choice)
        return FORMS[choice.kernel](x, self.weight, self.bias, dilation)
