"""The device a stage runs on (:func:`resolve_device`), mixed precision (``train.amp``,
``evaluate.amp``) and memory layout: one rule for every stage.

* CPU: bfloat16 autocast.  It is fast only where oneDNN has native bf16 kernels (AVX512-BF16
  or AMX); elsewhere bf16 convolutions are emulated and far *slower* than float32
  (docs/studies/2026-11-26-bf16-autocast-cpu.md), so :func:`amp_warning` says so when AMP is
  asked for there.
* CUDA: bfloat16 autocast where the GPU supports it (Ampere and later), no gradient scaling
  needed; float16 autocast with a :class:`torch.amp.GradScaler` on older GPUs.
* ``auto`` (:func:`resolve_amp`): bf16 autocast where the device runs bf16 natively (a CPU with
  ``avx512_bf16`` or ``amx_bf16``, a CUDA GPU with ``torch.cuda.is_bf16_supported()``), float32
  elsewhere, never fp16 (whose gradient scaling is a numerical change of its own).  On an AVX-512
  EPYC with ``avx512_bf16`` bf16 autocast trained 2-2.7x faster than float32 (issue 29); on the
  AVX2 EPYC of the committed run it was ~40x slower for one convolution.

Weights, optimiser state and the loss stay float32 (autocast only runs the eligible ops in
low precision), so checkpoints do not depend on the precision.  ``channels_last``
(``train.channels_last``) reorders the convolution inputs' memory, which cuDNN and oneDNN
prefer for some kernels; whether it helps is measured by ``benchmarks/bench_model.py``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from simprop.errors import DeviceUnavailable
from simprop.infra.machine import CPUINFO, NATIVE_BF16_FLAGS, cpu_flags


def amp_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype for ``device``: bf16 on CPU and on bf16-capable GPUs, else fp16."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``device`` with :func:`amp_dtype` (a no-op when not enabled)."""
    if not _resolved(enabled):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype(device))


def _resolved(enabled: bool) -> bool:
    """``enabled`` must be a decided bool: ``"auto"`` (truthy) would silently mean "on"."""
    if not isinstance(enabled, bool):
        raise TypeError(f"amp {enabled!r}: resolve it with resolve_amp(setting, device) first")
    return enabled


def needs_grad_scaler(device: torch.device, enabled: bool) -> bool:
    """fp16 gradients underflow without loss scaling; bf16 has float32's exponent range."""
    return _resolved(enabled) and amp_dtype(device) == torch.float16


def cpu_has_native_bf16(cpuinfo: str | Path = CPUINFO) -> bool:
    """Whether this CPU does bf16 arithmetic in hardware (AVX512-BF16 or AMX-BF16).

    The kernel's flags first: ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` answers whether
    oneDNN *runs* bf16 at all, which is true on any AVX-512 CPU (AVX512BW/VL/DQ: PyTorch's
    ``aten/src/ATen/native/mkldnn/Utils.h``), where bf16 is converted to float32 for the
    arithmetic.  Without ``/proc/cpuinfo`` it asks torch's own cpuinfo (``torch.cpu``), if this
    torch has it, and else says no.
    """
    flags = cpu_flags(cpuinfo)
    if flags is not None:
        return any(flag in flags for flag in NATIVE_BF16_FLAGS)
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return any(bool(probe()) for probe in probes if probe is not None)
    except (AttributeError, RuntimeError):
        return False


def device_has_native_bf16(device: torch.device) -> bool:
    """bf16 in hardware: :func:`cpu_has_native_bf16` on the CPU, ``torch.cuda.is_bf16_supported()``
    on CUDA (emulated bf16 excluded), no elsewhere."""
    if device.type == "cpu":
        return cpu_has_native_bf16()
    if device.type == "cuda":
        with torch.cuda.device(device):
            try:
                return bool(torch.cuda.is_bf16_supported(including_emulation=False))
            except TypeError:  # a torch before the argument (2.3): no emulation to exclude then
                return bool(torch.cuda.is_bf16_supported())
    return False


def resolve_amp(setting: bool | str, device: torch.device) -> bool:
    """``train.amp`` / ``evaluate.amp`` / ``simprop segment --amp`` -> autocast on or off:
    ``true`` / ``false`` as given; ``auto`` = on where :func:`device_has_native_bf16`."""
    if setting == "auto":
        return device_has_native_bf16(device)
    if isinstance(setting, bool):
        return setting
    raise ValueError(f"amp: {setting!r} is not true, false or 'auto'")


def precision(device: torch.device, enabled: bool) -> str:
    """What autocast runs the eligible ops in: ``fp32`` (off), ``bf16`` or ``fp16`` (the run's
    ``precision`` tag and metrics entry)."""
    if not enabled:
        return "fp32"
    return "fp16" if amp_dtype(device) == torch.float16 else "bf16"


def amp_warning(device: torch.device, enabled: bool) -> str | None:
    """A warning when AMP is asked for on a CPU that would run bf16 emulated (much slower)."""
    if _resolved(enabled) and device.type == "cpu" and not cpu_has_native_bf16():
        return (
            "AMP is on, but this CPU has no native bf16 (no avx512_bf16 / amx_bf16 flag): bf16 "
            "convolutions are emulated and much slower than float32 here; set train.amp / "
            "evaluate.amp to false (or auto) on this machine"
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
