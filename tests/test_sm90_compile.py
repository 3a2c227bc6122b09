"""The sm_90a compile gate: every Triton kernel the ops launch compiles for the H100, at
every launch configuration the ops can pick, without a GPU (moe_kernels/bench/sm90.py).

The interpreter that runs the other Triton tests compiles nothing, so code it passes can
fail on the first GPU launch (a plain global read in jit code is a NameError there). Each
supported triton version compiles in its own process (tests/triton_versions.py), as a
session job beside the in-process tests (tests/session_jobs.py).
"""

from __future__ import annotations

import json
import pathlib
import sys
import textwrap

import pytest

import session_jobs
from triton_versions import (VERSIONS, declare_per_version, declare_script_per_version,
                             json_result, results_per_version, version_id)


def _json_path(path) -> pathlib.Path:
    return session_jobs.scratch(f"sm90-{version_id(path)}.json")


declare_per_version("sm90-gate", lambda path: [sys.executable, "-m", "moe_kernels.bench.sm90",
                                               "--json", str(_json_path(path))],
                    module=__name__, fixture="reports")


@pytest.fixture(scope="module")
def reports():
    """The gate under every available triton; {path: (returncode, output, report dict)}."""
    results = {}
    for path, (rc, out, err) in results_per_version("sm90-gate").items():
        report = _json_path(path)
        results[path] = (rc, out + err, json.loads(report.read_text()) if report.exists() else None)
    return results


def _report(reports, path):
    rc, output, report = reports[path]
    assert report is not None, f"the gate produced no report:\n{output[-4000:]}"
    return rc, output, report


@pytest.mark.parametrize("triton_path", VERSIONS)
def test_every_launch_compiles_without_violations(reports, triton_path):
    """No compile error, no register spill, shared memory within 227 KB, every 16-bit or
    fp8 dot of >= 64 rows on wgmma (fp8 ones with both operands from shared memory)."""
    from moe_kernels.bench.sm90 import violations
    rc, output, report = _report(reports, triton_path)
    bad = [(r["case"], r["kernel"], violations(r)) for r in report["launches"]
           if violations(r)]
    assert not bad, "\n".join(f"{c} [{k}]: {'; '.join(v)}" for c, k, v in bad)
    assert rc == 0, output[-4000:]


@pytest.mark.parametrize("triton_path", VERSIONS)
def test_every_launched_kernel_has_a_compile_case(reports, triton_path):
    """A new `*_kernel` cannot skip the gate, nor can a kernel launched under another name
    (every other jit function must be called from jit code)."""
    _, _, report = _report(reports, triton_path)
    meta = report["meta"]
    assert len(meta["launched_kernels"]) >= 12
    assert set(meta["launched_kernels"]) <= set(meta["covered"]), \
        f"kernels without a compile case: {set(meta['launched_kernels']) - set(meta['covered'])}"
    assert meta["uncalled_helpers"] == []


# The grouped GEMMs' operands reach shared memory by cp.async or TMA, not LDG; their
# epilogue writes up to 470 MB per prefill call (GEMM2's bf16 out).
_WIDE_STORES = ("_contiguous_kernel", "_segments_kernel", "_masked_kernel",
                "_ws_contiguous_kernel", "_ws_segments_kernel")


@pytest.mark.parametrize("triton_path", VERSIONS)
def test_fp8_gemm_tiles_are_wgmma_from_shared_memory(reports, triton_path):
    """Every grouped-GEMM launch (decode tiles included: they swap A and B) runs fp8 wgmma
    with both operands copied global -> shared asynchronously (cp.async, TMA, or TMA by
    the warp-specialised kernel's producer partition), never through registers."""
    _, _, report = _report(reports, triton_path)
    gemms = [r for r in report["launches"] if r["kernel"] in _WIDE_STORES]
    assert len(gemms) >= 20 and {r["kernel"] for r in gemms} == set(_WIDE_STORES)
    for r in gemms:
        assert r["dots"], r["case"]
        for d in r["dots"]:
            assert (d["kind"], d["dtype"], d["a_from"], d["b_from"]) == \
                ("wgmma", "f8E4M3FN", "shared", "shared"), (r["case"], d)
            assert d["m"] >= 64, (r["case"], d)
        assert "registers" not in r["operand_path"] and r["operand_path"] != "-", r["case"]


# Memory-bound kernels at DeepSeek-V3 sizes: their data moves in 16-byte accesses
# (LDG.E.128 / STG.E.128), or bandwidth goals are out of reach (4-8 byte accesses issue
# 2-4x the instructions and transactions).
_WIDE_ACCESS = {"_gather_rows_kernel": ("D=7168",), "_unpermute_kernel": ("H=7168",),
                "_token_group_kernel": ("M=16384", "gathered R=4096"),
                "_block_quant_kernel": ("7168x2048",), "_block_dequant_kernel": ("7168x2048",),
                "_decompress_kernel": ("T=8192",)}


@pytest.mark.parametrize("triton_path", VERSIONS)
def test_memory_bound_kernels_move_data_in_16_byte_accesses(reports, triton_path):
    _, _, report = _report(reports, triton_path)
    checked = set()
    for r in report["launches"]:
        loads = any(size in r["case"] for size in _WIDE_ACCESS.get(r["kernel"], ()))
        if loads or r["kernel"] in _WIDE_STORES:
            access = r["global_access"]
            assert access, f"{r['case']}: no SASS to read"
            if loads:
                assert max(map(int, access["LDG"]), default=0) == 128, (r["case"], access)
            assert max(map(int, access["STG"]), default=0) == 128, (r["case"], access)
            checked.add(r["kernel"])
    want = set(_WIDE_ACCESS) | set(_WIDE_STORES)
    assert checked == want, want - checked


def test_global_access_widths_are_read_from_sass():
    """The width parser on SASS lines of each kind: asynchronous copies (LDGSTS) and TMA
    (UTMALDG) are not thread loads and are not counted."""
    from moe_kernels.bench import sm90
    sass = "\n".join([
        "  /*0100*/  LDG.E.128 R4, desc[UR6][R2.64] ;",
        "  /*0110*/  LDG.E R8, desc[UR6][R6.64] ;",
        "  /*0120*/  @!P0 LDG.E.64 R10, desc[UR6][R6.64+0x8] ;",
        "  /*0130*/  LDG.E.U16 R12, desc[UR6][R6.64] ;",
        "  /*0140*/  LDGSTS.E.BYPASS.128 [R3], desc[UR6][R4.64] ;",
        "  /*0150*/  UTMALDG.2D [UR8], [UR4] ;",
        "  /*0160*/  STG.E.128 desc[UR6][R2.64], R4 ;",
        "  /*0170*/  STG.E.U8 desc[UR6][R2.64], R9 ;",
        "  /*0180*/  LDS.128 R4, [R3] ;",
        "  /*0190*/  LDG.E.EL.128.CONSTANT R4, desc[UR6][R2.64] ;",
        "  /*01a0*/  STG.E.STRONG.GPU desc[UR6][R2.64], R4 ;",
    ])
    assert sm90._global_access(sass) == {"LDG": {128: 2, 32: 1, 64: 1, 16: 1},
                                         "STG": {128: 1, 8: 1, 32: 1}}


# Kernels that break each rule once, to show that the gate sees each kind of defect.
_BAD_KERNELS = textwrap.dedent('''
    import torch, triton, triton.language as tl
    from moe_kernels.bench import sm90

    PLAIN_GLOBAL = 3

    @triton.jit
    def global_kernel(x_ptr):
        tl.store(x_ptr, PLAIN_GLOBAL)

    @triton.jit
    def spill_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + i[:, None] * BLOCK + i[None, :])
        tl.store(out_ptr + i, tl.sum(tl.exp(x) * tl.sin(x) + x * tl.cos(x), axis=1))
        tl.store(out_ptr + BLOCK + i, tl.max(tl.exp(x) * x, axis=0))

    @triton.jit
    def uint8_dot_kernel(a_ptr, b_ptr, out_ptr, K, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            a = tl.load(a_ptr + i[:, None] * K + k0 + i[None, :])
            b = tl.load(b_ptr + (k0 + i[:, None]) * BLOCK + i[None, :])
            acc += tl.dot(a.to(tl.float8e4nv, bitcast=True), b.to(tl.float8e4nv, bitcast=True))
        tl.store(out_ptr + i[:, None] * BLOCK + i[None, :], acc)

    @triton.jit
    def mma_kernel(a_ptr, out_ptr, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        a = tl.load(a_ptr + i[:, None] * BLOCK + i[None, :])
        tl.store(out_ptr + i[:, None] * BLOCK + i[None, :], tl.dot(a, a))

    t = lambda *s, dtype=torch.float32: torch.empty(s, dtype=dtype, device="meta")
    sink, case = [], [""]
    with sm90.sm90_target(sink, case):
        case[0] = "global"; global_kernel[(1,)](t(1))
        case[0] = "spill"; spill_kernel[(1,)](t(64, 64), t(128), BLOCK=64, num_warps=1)
        case[0] = "uint8"; uint8_dot_kernel[(1,)](t(128, 512, dtype=torch.uint8),
            t(512, 128, dtype=torch.uint8), t(128, 128), 512, BLOCK=128, num_warps=4, num_stages=3)
        case[0] = "mma"; mma_kernel[(1,)](t(64, 64, dtype=torch.bfloat16), t(64, 64), BLOCK=64,
                                          num_warps=2)
    print(json.dumps({l.case: sm90.violations(sm90.analyse(l)) for l in sink}))
''')


declare_script_per_version("sm90-defects", "import json\n" + _BAD_KERNELS, module=__name__,
                           fixture="defect_reports")


@pytest.fixture(scope="module")
def defect_reports():
    """The bad kernels compiled under every available triton; {path: (returncode, stdout,
    stderr)}."""
    return results_per_version("sm90-defects")


@pytest.mark.parametrize("triton_path", VERSIONS)
def test_the_gate_catches_each_kind_of_defect(defect_reports, triton_path):
    found = json_result(defect_reports[triton_path])
    assert any("compile error" in v and "PLAIN_GLOBAL" in v for v in found["global"]), found
    assert any(v.startswith("spills") for v in found["spill"]), found
    assert any("through registers" in v for v in found["uint8"]), found
    assert any("not wgmma" in v for v in found["mma"]), found
