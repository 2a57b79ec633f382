"""Knowing the CPU: its ISA read from /proc/cpuinfo, the precision `auto` picks for it, and the
ranks of a job agreeing on the least capable node's answer."""
from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from nlpwf.runtime import isa

# Trimmed /proc/cpuinfo texts of the CPU families nlpwf meets (flags as Linux names them).
ICE_LAKE = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8370C CPU @ 2.80GHz
flags\t\t: fpu sse sse2 avx avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni avx512_vbmi2
"""
SAPPHIRE_RAPIDS = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8473C
flags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16 avx_vnni amx_bf16 amx_tile amx_int8
"""
GENOA = """processor\t: 0
model name\t: AMD EPYC 9V74 80-Core Processor
flags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16
"""
CASCADE_LAKE = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8272CL CPU @ 2.60GHz
flags\t\t: fpu avx2 avx512f avx512_vnni
"""
OLD = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx2\n"


@pytest.mark.parametrize("text, bf16, int8", [
    (ICE_LAKE, False, True), (CASCADE_LAKE, False, True), (SAPPHIRE_RAPIDS, True, True), (GENOA, True, True), (OLD, False, False),
], ids=["ice_lake", "cascade_lake", "sapphire_rapids", "genoa", "avx2_only"])
def test_native_bf16_and_int8_from_cpuinfo(text, bf16, int8):
    found = isa.from_cpuinfo(text)
    assert (found.native_bf16, found.int8_dot_product) == (bf16, int8)
    assert isa.choose("auto", found.native_bf16) == ("bf16" if bf16 else "fp32")
    assert isa.choose("bf16", found.native_bf16) == "bf16" and isa.choose("fp32", found.native_bf16) == "fp32"


def test_amx_counts_as_native_bf16_without_avx512_bf16():
    text = SAPPHIRE_RAPIDS.replace(" avx512_bf16", "")
    assert isa.from_cpuinfo(text).native_bf16


@pytest.mark.parametrize("cap, bf16, int8, amx", [
    ("AVX512_CORE_VNNI", False, True, False), ("avx512_core_bf16", True, True, False), ("AVX2", False, False, False),
    ("AVX10_1_512_AMX", True, True, True), ("ALL", True, True, True), ("NO_SUCH_ISA", True, True, True), (None, True, True, True),
])
def test_a_onednn_isa_cap_narrows_what_counts_as_native(cap, bf16, int8, amx):
    # Sapphire Rapids with oneDNN held below bf16 computes bf16 as Ice Lake does: emulated
    found = isa.onednn_cap(isa.from_cpuinfo(SAPPHIRE_RAPIDS), cap)
    assert (found.native_bf16, found.int8_dot_product, found.amx_bf16, found.amx_int8) == (bf16, int8, amx, amx)
    assert ("capped" in found.cpu) == (not amx)  # said wherever the cap took something away


def test_no_flags_line_is_not_a_guess():
    assert isa.from_cpuinfo("processor\t: 0\n") is None


def test_this_machine_is_detected():
    found = isa.detect()
    assert found.cpu and isinstance(found.native_bf16, bool)
    assert "native_bf16" in found.as_dict()


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="needs Linux's /proc/cpuinfo to compare with")
def test_torch_public_probe_agrees_with_the_kernel():
    """The fallback where /proc/cpuinfo is missing (torch.cpu.get_capabilities) reads the same
    features as the kernel on this machine, under its own names (avx512_f for avx512f)."""
    kernel = isa.from_cpuinfo(Path("/proc/cpuinfo").read_text())
    probed = isa.from_torch()
    features = [name for name in isa.NEEDS]
    assert {f: getattr(probed, f) for f in features} == {f: getattr(kernel, f) for f in features}


def _rank(rank: int, port: int, native: bool, out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        out.put((rank, isa.choose("auto", isa.agree(native))))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("natives, expected", [
    ((True, False), "fp32"),  # they disagree: the fast loop keeps this one, each case spawns two ranks
    pytest.param((True, True), "bf16", marks=pytest.mark.slow),
    pytest.param((False, False), "fp32", marks=pytest.mark.slow)])
def test_ranks_agree_on_the_least_capable_node(natives, expected):
    from nlpwf.runtime.workers import free_port

    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, natives[r], out)) for r in range(2)]
    for p in procs:
        p.start()
    answers = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert answers == {0: expected, 1: expected}


def test_emulated_bf16_gets_one_warning_line_with_the_measured_slowdown(caplog):
    ice_lake = isa.from_cpuinfo(ICE_LAKE)
    with caplog.at_level("WARNING", logger=isa.__name__):
        isa.warn_if_emulated("bf16", ice_lake)
        isa.warn_if_emulated("fp32", ice_lake)  # fp32 is never emulated
        isa.warn_if_emulated("bf16", isa.from_cpuinfo(SAPPHIRE_RAPIDS))  # native: nothing to say
    [record] = caplog.records
    line = record.getMessage()
    assert "\n" not in line and "Intel(R) Xeon(R) Platinum 8370C" in line and "precision=auto" in line
    slowdown = float(line.split("took ")[1].split("x the time")[0])
    assert slowdown > 0


def test_resolve_outside_a_group_follows_this_cpu(caplog):
    native = isa.detect().native_bf16
    with caplog.at_level("INFO", logger=isa.__name__):
        assert isa.resolve("auto") == ("bf16" if native else "fp32")
    assert any("precision=auto runs in" in r.getMessage() and isa.detect().cpu in r.getMessage() for r in caplog.records)
    caplog.clear()
    assert isa.resolve("fp32", announce=False) == "fp32" and not caplog.records
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        isa.resolve("fp8")
