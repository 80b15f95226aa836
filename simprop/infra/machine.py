"""What a run ran on: the CPU, native bf16, the GPU, torch's CPU kernels and threads, and the
versions of Python and the libraries whose kernels and defaults decide its numbers (issue 29).

Why: a timing, a kernel choice (``model.conv_kernel: auto``) or a precision (``amp: auto``)
means little without the machine, and float rounding differs between CPUs and library versions
(docs/data.md, "Reproducibility notes").  :func:`machine_info` is set as ``machine.*`` tags on
every stage run (:func:`simprop.infra.tracking.tags.stage_tags`) and written as the
``"machine"`` block of the train and evaluate metrics files.  The host name is not here: the
``host`` tag says where a run ran.

No import of torch (nor of dvc or mlflow): a stage that does not use torch (``download``,
``splits``, ...) must not pay its ~2 s import for a tag.  Library versions come from the
installed distributions' metadata (:mod:`importlib.metadata`); what only a loaded torch can say
(its CPU capability, threads and GPU) is read when torch is already imported, and is
``"torch not loaded"`` otherwise.  Every value is a string, so the block is valid as tags and
``dvc metrics show`` lists it beside the numbers.
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from pathlib import Path

LIBRARIES = ("torch", "torchvision", "numpy", "mlflow", "dvc")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of bf16 arithmetic in hardware
NOT_LOADED = "torch not loaded"
CPUINFO = "/proc/cpuinfo"


def cpuinfo_field(name: str, cpuinfo: str | Path = CPUINFO) -> str | None:
    """The first processor's ``name`` line in ``/proc/cpuinfo`` (``model name``, ``flags``);
    ``None`` where there is no such file (not Linux) or no such line (e.g. ``model name`` on
    some ARM kernels)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return None


def cpu_flags(cpuinfo: str | Path = CPUINFO) -> set[str] | None:
    """The CPU's feature flags (``/proc/cpuinfo``), ``None`` where unknown."""
    flags = cpuinfo_field("flags", cpuinfo)
    return None if flags is None else set(flags.split())


def cpu_model(cpuinfo: str | Path = CPUINFO) -> str:
    """``AMD EPYC 9R14 96-Core Processor``: ``/proc/cpuinfo``'s model name, else what
    :mod:`platform` knows (the architecture at least)."""
    return cpuinfo_field("model name", cpuinfo) or platform.processor() or platform.machine() or "unknown"


def native_bf16_flags(cpuinfo: str | Path = CPUINFO) -> str:
    """``yes (avx512_bf16, amx_bf16)`` / ``no`` / ``unknown`` (no ``/proc/cpuinfo``)."""
    flags = cpu_flags(cpuinfo)
    if flags is None:
        return "unknown"
    found = [flag for flag in NATIVE_BF16_FLAGS if flag in flags]
    return f"yes ({', '.join(found)})" if found else "no"


def library_version(name: str) -> str:
    """The installed version of distribution ``name`` (not imported), or ``not installed``."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _torch_facts() -> dict[str, str]:
    torch = sys.modules.get("torch")
    if torch is None:
        return {"torch_cpu_capability": NOT_LOADED, "torch_threads": NOT_LOADED, "gpu": NOT_LOADED}
    try:
        capability = str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):  # a torch before 2.0
        capability = "unknown"
    gpu = "none"
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        gpu = ", ".join(f"{count} x {name}" if count > 1 else name for name, count in _counted(names))
    return {"torch_cpu_capability": capability, "torch_threads": str(torch.get_num_threads()), "gpu": gpu}


def _counted(names: list[str]) -> list[tuple[str, int]]:
    return [(name, names.count(name)) for name in dict.fromkeys(names)]


def machine_info(cpuinfo: str | Path = CPUINFO) -> dict[str, str]:
    """The machine and libraries of this process, every value a string::

        {"cpu_model": "AMD EPYC", "cpu_native_bf16": "no", "torch_cpu_capability": "AVX2",
         "torch_threads": "2", "gpu": "none", "python": "3.11.2",
         "torch": "2.14.1+cu130", "torchvision": "0.29.1+cu130", "numpy": ..., "mlflow": ..., "dvc": ...}
    """
    info = {"cpu_model": cpu_model(cpuinfo), "cpu_native_bf16": native_bf16_flags(cpuinfo), **_torch_facts(),
            "python": platform.python_version()}  # fmt: skip
    info.update({name: library_version(name) for name in LIBRARIES})
    torch = sys.modules.get("torch")
    if torch is not None:  # the loaded build's own version: with its local part (+cu130, +cpu)
        info["torch"] = str(torch.__version__)
    return info


def machine_tags(info: dict[str, str] | None = None) -> dict[str, str]:
    """:func:`machine_info` as MLflow tags: ``machine.cpu_model``, ``machine.torch``, ..."""
    return {f"machine.{key}": value for key, value in (machine_info() if info is None else info).items()}
