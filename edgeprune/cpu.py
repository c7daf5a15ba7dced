"""What this host's CPU offers recovery: bf16 arithmetic, and how many cores torch may use.

bf16 autocast pays on a CPU only where the instructions exist: AVX512-BF16 (``avx512_bf16``) or AMX
(``amx_bf16``), read from ``/proc/cpuinfo`` (Linux; other systems are taken to lack them) and confirmed by
oneDNN (``torch.backends.mkldnn``). Elsewhere bf16 is emulated and slower than fp32, so recovery runs fp32.
``EDGEPRUNE_CPU_BF16=0`` forces "no bf16" (to reproduce an fp32-only host, and in tests); ``=1`` forces "bf16"
(for a CPU whose flags this check misreads). The answer is cached for the process. "Confirmed by oneDNN" means
oneDNN is in this torch build; it then picks the bf16 kernels the flags allow.

:func:`compile_support` says whether :func:`torch.compile` can run here (TorchDynamo supports this Python and
a C++ compiler is on PATH); recovery only turns it on by itself where it can.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import FrozenSet, Tuple

__all__ = ["cpu_flags", "bf16_support", "usable_cores", "compile_support", "ENV_BF16"]

ENV_BF16 = "EDGEPRUNE_CPU_BF16"
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> FrozenSet[str]:
    """The feature flags of the first CPU in ``cpuinfo`` (empty where it cannot be read)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@functools.lru_cache(maxsize=None)
def _detected() -> Tuple[bool, str]:
    flags = cpu_flags()
    have = [f for f in BF16_FLAGS if f in flags]
    if not have:
        return False, "the CPU has neither AVX512-BF16 nor AMX (no avx512_bf16/amx_bf16 flag in /proc/cpuinfo)"
    import torch

    if not torch.backends.mkldnn.is_available():
        return False, "this torch build has no oneDNN (mkldnn), which runs bf16 on the CPU"
    return True, f"CPU flags {', '.join(have)}"


def bf16_support() -> Tuple[bool, str]:
    """(whether recovery should use bf16 autocast on this CPU, why), honouring ``EDGEPRUNE_CPU_BF16``."""
    forced = os.environ.get(ENV_BF16, "").strip()
    if forced in ("0", "1"):
        return forced == "1", f"{ENV_BF16}={forced}"
    if forced:
        from .errors import UsageError

        raise UsageError(f"{ENV_BF16}: must be 0 or 1, got {forced!r}")
    return _detected()


@functools.lru_cache(maxsize=None)
def compile_support() -> Tuple[bool, str]:
    """(whether :func:`torch.compile` can work here, why not): TorchDynamo supports this Python and a C++
    compiler is on PATH (inductor builds its CPU kernels with it)."""
    import shutil

    import torch

    try:
        ok = bool(torch._dynamo.is_dynamo_supported())
    except Exception as e:  # a torch without dynamo
        return False, f"torch.compile unavailable ({type(e).__name__})"
    if not ok:
        return False, "TorchDynamo does not support this Python"
    cxx = os.environ.get("CXX") or next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
    if not cxx:
        return False, "no C++ compiler on PATH (g++, c++ or clang++) for inductor's CPU kernels"
    return True, f"C++ compiler {cxx}"


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
