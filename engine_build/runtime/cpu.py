"""The CPU a check ran on: its model and the vector extensions that change INT8 and bf16 numerics;
and how many of its cores this process may use.

INT8 and bf16 kernels differ between CPUs (AVX2 without VNNI multiplies pairs into saturating
16-bit sums, AVX-512 VNNI and AMX do not; bf16 runs only where avx512_bf16 or AMX exist), so a
variant validated on one CPU is re-checked where the extensions that pick the kernels differ.
"""
from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path

# Flags (as /proc/cpuinfo spells them) that select different INT8/bf16/FP16 kernels in ONNX Runtime
# (MLAS) and OpenVINO (oneDNN). Extensions outside these lists change speed, not results.
NUMERICS_FLAGS = (
    "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "avx_vnni",
    "avx_vnni_int8", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "amx_fp16",  # x86-64
    "asimd", "asimdhp", "asimddp", "i8mm", "bf16", "sve", "sve2",          # arm64
)


def _cpuinfo(text: str) -> tuple[str, set[str]]:
    """The model name and the flags of the first processor in a /proc/cpuinfo text."""
    model, flags = "", set[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model, flags


def describe_cpu(cpuinfo: str | None = None) -> dict:
    """{"model", "machine", "extensions"}: ``extensions`` are the :data:`NUMERICS_FLAGS` this CPU has."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, flags = _cpuinfo(cpuinfo)
    return {"model": model or platform.processor() or "unknown", "machine": platform.machine(),
            "extensions": [f for f in NUMERICS_FLAGS if f in flags]}


@lru_cache(maxsize=1)
def this_cpu() -> dict:
    """:func:`describe_cpu` of the machine this process runs on (read once)."""
    return describe_cpu()


def numerics_differ(recorded: dict | None, current: dict) -> str | None:
    """Why a check recorded on ``recorded`` may not hold on ``current`` (None when it holds)."""
    if not recorded:
        return "its CPU was not recorded"
    if recorded.get("machine") != current.get("machine"):
        return f"validated on {recorded.get('machine')}, running on {current.get('machine')}"
    had, has = set(recorded.get("extensions", ())), set(current.get("extensions", ()))
    if had == has:
        return None
    parts = []
    if had - has:
        parts.append("lacks " + ", ".join(f for f in NUMERICS_FLAGS if f in had - has))
    if has - had:
        parts.append("adds " + ", ".join(f for f in NUMERICS_FLAGS if f in has - had))
    return f"validated on {recorded.get('model', '?')}; this CPU ({current.get('model', '?')}) " + " and ".join(parts)


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask (``taskset``, a container's cpuset) where the
    system has one, else the machine's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:   # no affinity call on this system (macOS, Windows)
        return os.cpu_count() or 1
