"""The device a stage runs on (:func:`resolve_device`), mixed precision (``train.amp``,
``evaluate.amp``) and memory layout: one rule for every stage.

* CPU: bfloat16 autocast.  It is fast only where oneDNN has native bf16 kernels (AVX512-BF16
  or AMX); elsewhere bf16 convolutions are emulated and far *slower* than float32
  (docs/studies/2026-11-26-bf16-autocast-cpu.md), so :func:`amp_warning` says so when AMP is
  asked for there.
* CUDA: bfloat16 autocast where the GPU supports it (Ampere and later), no gradient scaling
  needed; float16 autocast with a :class:`torch.amp.GradScaler` on older GPUs.

Weights, optimiser state and the loss stay float32 (autocast only runs the eligible ops in
low precision), so checkpoints do not depend on the precision.  ``channels_last``
(``train.channels_last``) reorders the convolution inputs' memory, which cuDNN and oneDNN
prefer for some kernels; whether it helps is measured by ``benchmarks/bench_model.py``.
"""

from __future__ import annotations

import contextlib

import torch

from simprop.errors import DeviceUnavailable


def amp_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype for ``device``: bf16 on CPU and on bf16-capable GPUs, else fp16."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``device`` with :func:`amp_dtype` (a no-op when not enabled)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype(device))


def needs_grad_scaler(device: torch.device, enabled: bool) -> bool:
    """fp16 gradients underflow without loss scaling; bf16 has float32's exponent range."""
    return enabled and amp_dtype(device) == torch.float16


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16 / AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def amp_warning(device: torch.device, enabled: bool) -> str | None:
    """A warning when AMP is asked for on a CPU that would run bf16 emulated (much slower)."""
    if enabled and device.type == "cpu" and not cpu_has_native_bf16():
        return (
            "AMP is on, but this CPU has no native bf16 (oneDNN reports no AVX512-BF16/AMX): bf16 "
            "convolutions are emulated and much slower than float32 here; set train.amp / "
            "evaluate.amp to false on this machine"
        )
    return None


def resolve_device(name: str, key: str = "device") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; explicit names are honoured (and checked).

    ``key`` names the parameter in the error (e.g. ``train.device``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(
            f"{key}: {name!r} was requested but CUDA is not available on this machine; set {key}: auto (or cpu)"
        )
    return device
