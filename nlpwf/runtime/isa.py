"""What this CPU computes natively, and the precision that follows from it.

bf16 autocast pays only where the CPU has bf16 arithmetic: AVX512-BF16 (AMD Zen 4, Intel
Cooper Lake) or AMX-BF16 tiles (Intel Sapphire Rapids and later). Elsewhere (Ice Lake, Cascade
Lake: what Azure's D-series v5/v4 often give) oneDNN emulates it and bf16 runs slower than fp32.
INT8 likewise wants VNNI (AVX512-VNNI or AVX-VNNI) or AMX-INT8.

Read from /proc/cpuinfo (the kernel's view, on every Linux node), else from torch's own probe,
then narrowed to what oneDNN may use when `ONEDNN_MAX_CPU_ISA` caps it (an image or a cluster
may set it; it also makes this machine stand in for an older CPU).
`precision=auto` is decided on the machines that run the job, and the ranks of a job agree on
the least capable node's answer (`agree`).
"""
from __future__ import annotations

import functools
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from nlpwf.config.checks import PRECISIONS
from nlpwf.runtime import collective

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Isa:
    cpu: str
    avx512: bool
    avx512_bf16: bool
    avx512_vnni: bool
    avx_vnni: bool
    amx_bf16: bool
    amx_int8: bool

    @property
    def native_bf16(self) -> bool:
        return self.avx512_bf16 or self.amx_bf16

    @property
    def int8_dot_product(self) -> bool:
        """VNNI or AMX-INT8: INT8 matmuls with one instruction per multiply-accumulate group."""
        return self.avx512_vnni or self.avx_vnni or self.amx_int8

    def summary(self) -> str:
        have = [name for name in ("avx512", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8") if getattr(self, name)]
        return f"{self.cpu}: {', '.join(have) or 'no AVX-512, VNNI or AMX'}"

    def as_dict(self) -> dict:
        return {**asdict(self), "native_bf16": self.native_bf16, "int8_dot_product": self.int8_dot_product}


def from_cpuinfo(text: str) -> Isa | None:
    """The ISA of the first processor listed in a /proc/cpuinfo text (x86 `flags` lines)."""
    flags: set[str] = set()
    cpu = "unknown CPU"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and cpu == "unknown CPU":
            cpu = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    if not flags:
        return None
    return Isa(cpu=cpu, avx512="avx512f" in flags, avx512_bf16="avx512_bf16" in flags, avx512_vnni="avx512_vnni" in flags,
               avx_vnni="avx_vnni" in flags, amx_bf16="amx_bf16" in flags, amx_int8="amx_int8" in flags)


def from_torch() -> Isa:
    """torch's own CPUID probe (the cpuinfo library): where /proc/cpuinfo is missing (not Linux).
    Its names are cpuinfo's (`avx512_f` for the kernel's `avx512f`). An older torch without this
    public probe reports nothing here, so nothing counts as native: fp32, never a guess."""
    import torch

    probe = getattr(torch.cpu, "get_capabilities", None)
    caps = probe() if probe is not None else {}
    return Isa(cpu=str(caps.get("cpu_name", "unknown CPU")), avx512=bool(caps.get("avx512_f")),
               avx512_bf16=bool(caps.get("avx512_bf16")), avx512_vnni=bool(caps.get("avx512_vnni")),
               avx_vnni=bool(caps.get("avx_vnni")), amx_bf16=bool(caps.get("amx_bf16")), amx_int8=bool(caps.get("amx_int8")))


# oneDNN's ISA levels (its ONEDNN_MAX_CPU_ISA values, old names beside the AVX10 ones), lowest
# first, and the level each feature needs: a cap below it means oneDNN's matmuls run without it.
ONEDNN_LEVELS = ["SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI", "AVX512_CORE_BF16",
                 "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2"]
ONEDNN_ALIASES = {"AVX10_1_512": "AVX512_CORE_FP16", "AVX10_1_512_AMX": "AVX512_CORE_AMX",
                  "AVX10_1_512_AMX_FP16": "AVX512_CORE_AMX_FP16"}
NEEDS = {"avx512": "AVX512_CORE", "avx512_vnni": "AVX512_CORE_VNNI", "avx_vnni": "AVX2_VNNI",
         "avx512_bf16": "AVX512_CORE_BF16", "amx_bf16": "AVX512_CORE_AMX", "amx_int8": "AVX512_CORE_AMX"}


def onednn_cap(isa: Isa, value: str | None) -> Isa:
    """`isa` as oneDNN may use it under ONEDNN_MAX_CPU_ISA=`value` (None, ALL, DEFAULT or a value
    oneDNN does not know: no cap, as oneDNN itself treats them)."""
    level = ONEDNN_ALIASES.get((value or "").upper(), (value or "").upper())
    if level not in ONEDNN_LEVELS:
        return isa
    rank = ONEDNN_LEVELS.index(level)
    kept = {name: getattr(isa, name) and rank >= ONEDNN_LEVELS.index(needs) for name, needs in NEEDS.items()}
    if kept == {name: getattr(isa, name) for name in NEEDS}:
        return isa
    return Isa(cpu=f"{isa.cpu} (oneDNN capped at {level})", **kept)


@functools.lru_cache(maxsize=1)
def detect() -> Isa:
    try:
        isa = from_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        isa = None
    return onednn_cap(isa or from_torch(), os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA"))


def choose(requested: str, native_bf16: bool) -> str:
    """The precision a job runs in: `auto` is bf16 where the CPU has native bf16, else fp32; an
    explicit choice is kept (a warning says when bf16 is emulated, see `warn_if_emulated`)."""
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}")
    if requested == "auto":
        return "bf16" if native_bf16 else "fp32"
    return requested


def agree(native_bf16: bool) -> bool:
    """True on every rank only when every rank's CPU has native bf16: a job whose nodes differ
    (Azure may place one job on Ice Lake and Sapphire Rapids hosts) follows its least capable
    node. Outside a process group, this process's own answer."""
    return not collective.any_rank(not native_bf16)


def bf16_slowdown(size: int = 512, reps: int = 7) -> float:
    """How many times slower a bf16 matmul runs than fp32 on this CPU: the number a warning about
    emulated bf16 quotes. The two dtypes take turns and the median of the per-turn ratios is kept,
    so a burst of load from another process lands on one turn, not on one dtype."""
    import torch

    a = torch.randn(size, size)
    operands = {dtype: a.to(dtype) for dtype in (torch.float32, torch.bfloat16)}
    for x in operands.values():
        torch.mm(x, x)  # warm-up: oneDNN picks its kernel on the first call
    ratios = []
    for _ in range(reps):
        took = {}
        for dtype, x in operands.items():
            start = time.perf_counter()
            torch.mm(x, x)
            took[dtype] = time.perf_counter() - start
        ratios.append(took[torch.bfloat16] / took[torch.float32])
    return statistics.median(ratios)


def resolve(requested: str, announce: bool = True) -> str:
    """The precision this process runs in, for the `precision` option `requested`. In a process
    group every rank must call it (`auto` is agreed collectively). `announce`: log the CPU and
    the choice, and warn about emulated bf16 (one process per node does, not every rank)."""
    found = detect()
    native = agree(found.native_bf16) if requested == "auto" else found.native_bf16
    chosen = choose(requested, native)
    if announce:
        why = ""
        if requested == "auto":
            why = " (native bf16)" if native else (" (no native bf16 on this CPU)" if not found.native_bf16
                                                   else " (a node of this job has no native bf16)")
        log.info("CPU %s; precision=%s runs in %s%s", found.summary(), requested, chosen, why)
        warn_if_emulated(chosen, found)
    return chosen


def warn_if_emulated(chosen: str, isa: Isa) -> None:
    if chosen == "bf16" and not isa.native_bf16:
        log.warning("precision=bf16 on a CPU without native bf16 (%s): a bf16 matmul took %.2gx the time of fp32 here; "
                    "precision=auto picks what this CPU computes natively", isa.summary(), bf16_slowdown())
