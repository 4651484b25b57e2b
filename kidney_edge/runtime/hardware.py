"""What this machine offers the runtime: usable CPUs (affinity and cgroup quota) and CPU facts.

:func:`available_cpus` sizes thread pools from the CPUs this process may actually use, not
from the host's core count, which over-subscribes containers. :func:`cpu_info` is the one
reader of ``/proc/cpuinfo``: the benchmark record and the INT8 recipe both describe the CPU
from it, because fp32 and INT8 kernel speed depend on its instruction sets.
"""

from __future__ import annotations

import logging
import math
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
_CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
_CPUINFO = Path("/proc/cpuinfo")

# Instruction sets that pick onnxruntime's fp32 and INT8 kernels. AVX2 vpmaddubsw (U8S8) sums
# u8 x s8 products in int16; VNNI (vpdpbusd) accumulates INT8 dot products in int32.
ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_int8",
)
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni"})


def _cgroup_cpu_limit() -> float | None:
    """CPU quota of this process's cgroup in CPUs (e.g. 1.5), or None when unlimited/unknown."""
    try:
        if _CGROUP_V2_CPU_MAX.exists():
            quota, period = _CGROUP_V2_CPU_MAX.read_text().split()[:2]
            if quota == "max":
                return None
            return int(quota) / int(period)
        if _CGROUP_V1_QUOTA.exists() and _CGROUP_V1_PERIOD.exists():
            quota_us = int(_CGROUP_V1_QUOTA.read_text())
            period_us = int(_CGROUP_V1_PERIOD.read_text())
            return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError) as exc:
        log.debug("cannot read the cgroup CPU quota: %s", exc)
    return None


def available_cpus() -> int:
    """CPUs this process may use: min(affinity mask, cgroup quota rounded up), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, max(1, math.ceil(limit)))
    return max(1, cpus)


@dataclass(frozen=True)
class CpuInfo:
    """The CPU's model name, architecture (``platform.machine()``) and feature flags."""

    model: str
    machine: str
    flags: frozenset[str]

    @property
    def isa(self) -> dict[str, bool]:
        """{flag: present} for every flag of :data:`ISA_FLAGS`."""
        return {flag: flag in self.flags for flag in ISA_FLAGS}

    @property
    def vnni(self) -> bool:
        return bool(self.flags & VNNI_FLAGS)


def cpu_info() -> CpuInfo:
    """The first processor's ``model name`` and ``flags`` from /proc/cpuinfo.

    Without /proc/cpuinfo (not Linux) the flags are empty (unknown rather than guessed) and the
    model is what :mod:`platform` says.
    """
    model, flags = "", frozenset()
    try:
        for line in _CPUINFO.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = frozenset(value.split())
    except OSError:
        log.debug("no %s: CPU model and instruction sets unknown", _CPUINFO)
    machine = platform.machine()
    return CpuInfo(model or platform.processor() or machine or "unknown", machine, flags)


def cpu_isa() -> dict[str, Any]:
    """The CPU facts INT8 speed and numerics depend on, with the onnxruntime version (recorded
    in the INT8 recipe: a QDQ file's behaviour follows the CPU that runs it)."""
    import onnxruntime

    info = cpu_info()
    return {
        "machine": info.machine,
        "cpu": info.model,
        "cpus": os.cpu_count(),
        **info.isa,
        "vnni": info.vnni,
        "onnxruntime": onnxruntime.__version__,
    }


def cpu_kind_label(model: str, isa: Mapping[str, bool], cores: int) -> str:
    """A label for a CPU kind: model name, SIMD width, VNNI and usable cores. INT8 speed and
    numerics depend on these, so results, recipes and probes are kept per kind."""
    vnni = any(isa.get(flag) for flag in VNNI_FLAGS)
    simd = "AVX-512" if isa.get("avx512f") else "AVX2" if isa.get("avx2") else "no AVX2"
    return f"{model} ({simd}, {'VNNI' if vnni else 'no VNNI'}, {cores} cores)"


def cpu_kind() -> str:
    """This machine's :func:`cpu_kind_label` (usable cores: affinity and cgroup quota)."""
    info = cpu_info()
    return cpu_kind_label(info.model, info.isa, available_cpus())
