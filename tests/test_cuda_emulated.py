"""The CUDA C++ kernels (csrc/cuda/*.cuh) against the reference on the CPU, emulated
(tests/cuda_emulation.py): each CUDA thread a std::thread, under AddressSanitizer +
UndefinedBehaviorSanitizer (every case) and ThreadSanitizer (cases chosen for their
blocks, warps and chunks). Integer outputs compare exactly; grouped_topk's weights by
test_gating's rule. Mutants prove each sanitizer's check can fail. The GPU run
(benchmarks/gpu_check.sh) still runs these kernels for real; this catches logic, bounds and
barrier bugs before it, in every CI run."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cuda_emulation as emu
import session_jobs
from helpers import assert_int_equal
from moe_kernels import testing
from moe_kernels.reference import permute as ref_permute
import test_gating
from test_gating import CONFIGS, assert_same_selection, kwargs_of, make_inputs

BUILDS = {s: (s, None) for s in emu.SANITIZERS} | {
    f"mutant-{m}": (sanitizer, m) for m, (sanitizer, _) in emu.MUTANTS.items()}


def _dir(build: str):
    return session_jobs.scratch(f"cuda_emu_{build}")


for _build, (_sanitizer, _mutant) in BUILDS.items():
    session_jobs.declare(f"cuda-emulator-{_build}",
                         emu.build_argv(_sanitizer, _dir(_build), _mutant),
                         module=__name__, fixture="asan" if _build == "asan" else
                         "tsan" if _build == "tsan" else "mutants", timeout_s=600)


def _driver(build: str) -> emu.Emulated:
    why = emu.available()
    if why:
        pytest.skip(why)
    rc, out, err = session_jobs.result(f"cuda-emulator-{build}")
    if rc == emu.SKIP:
        pytest.skip(f"cannot build the emulated kernels: {err.strip()}")
    assert rc == 0, f"building the emulated CUDA kernels ({build}) failed:\n{out}\n{err[-6000:]}"
    return emu.Emulated(emu.binary(BUILDS[build][0], _dir(build)), build)


@pytest.fixture(scope="module")
def asan():
    driver = _driver("asan")
    yield driver
    driver.close()


@pytest.fixture(scope="module")
def tsan():
    driver = _driver("tsan")
    yield driver
    driver.close()


@pytest.fixture(scope="module")
def mutants():
    drivers = {m: _driver(f"mutant-{m}") for m in emu.MUTANTS}
    yield drivers
    for d in drivers.values():
        d.close()


# --- permutation index: permute_index_cuda, moe_align_block_size_cuda --------------------

def _ids(T, K, E, seed, *, skipped=0.0, dtype=torch.int32):
    """(T, K) experts drawn with repeats (the kernels must not assume distinct ids); a
    fraction `skipped` replaced by ids the layout skips: -1, other negatives, >= E."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, E, (T, K), generator=g)
    if skipped:
        bad = torch.tensor([-1, -7, E, E + 5])[torch.randint(0, 4, (T, K), generator=g)]
        ids = torch.where(torch.rand(T, K, generator=g) < skipped, bad, ids)
    return ids.to(dtype)


def _one_expert(T, K, e):
    return torch.full((T, K), e, dtype=torch.int32)


# name: (topk_ids, E, align). Kernel 1 takes 256 pairs a block, 8 warps of 32; kernel 2
# scans on one 1024-thread block.
ROUTINGS = {
    "empty": lambda: (_ids(0, 8, 16, 0), 16, 4),            # P=0: only the scan, on zeros
    "one_token_decode": lambda: (_ids(1, 8, 256, 1), 256, 128),
    "all_on_one_expert": lambda: (_one_expert(300, 2, 3), 5, 16),   # one match group per
    # warp, ranks carried across 8 warps and 3 chunks
    "skipped_ids": lambda: (_ids(50, 4, 9, 2, skipped=0.3), 9, 4),  # -1, < -1, >= E
    "experts_not_power_of_two": lambda: (_ids(61, 3, 7, 3), 7, 3),
    "partial_last_chunk": lambda: (_ids(300, 3, 32, 4), 32, 8),     # 900 pairs: 3 + 132
    "one_expert": lambda: (_ids(20, 1, 1, 5), 1, 1),
    "max_experts": lambda: (_ids(40, 8, 1024, 6), 1024, 1),   # the 32 KB count table full
    "align_1": lambda: (_ids(33, 8, 64, 7, skipped=0.1), 64, 1),
    "int64_strided_ids": lambda: (_ids(30, 12, 40, 8, dtype=torch.int64)[:, ::2], 40, 4),
    "deepseek_v3_prefill": lambda: (_ids(512, 8, 256, 9), 256, 128),   # 16 chunks
}
# ThreadSanitizer (about 10x slower) on the cases that exercise every barrier: several
# chunks and warps, a partial chunk, the largest scan.
RACE_CASES = ("all_on_one_expert", "partial_last_chunk", "max_experts")


def _check_index(driver, name):
    ids, E, align = ROUTINGS[name]()
    got = driver.permute_index(ids, E, align)
    want = ref_permute.permute_index(ids, E, align)
    for out, g, w in zip(("expert_offsets", "tokens_per_expert", "m_indices", "row_of_pair",
                          "pair_of_row"), got, want):
        assert_int_equal(g, w.to(g.dtype), msg=f"{name}: permute_index {out}")
    got = driver.moe_align_block_size(ids, E, align)
    want = ref_permute.moe_align_block_size(ids, E, align)
    for out, g, w in zip(("sorted_token_ids", "expert_ids", "num_tokens_post_padded"), got,
                         want):
        assert_int_equal(g, w, msg=f"{name}: moe_align_block_size {out}")


@pytest.mark.parametrize("name", list(ROUTINGS))
def test_permute_index_asan(asan, name):
    _check_index(asan, name)


@pytest.mark.parametrize("name", RACE_CASES)
def test_permute_index_tsan(tsan, name):
    _check_index(tsan, name)


@pytest.mark.parametrize("preset", testing.PRESETS)
def test_moe_align_block_size_checker_cases(asan, preset):
    """The cases `moe-check` runs, compared exactly (ours are ascending in each run)."""
    for case in testing.cases("moe_align_block_size", preset):
        a = case.inputs
        got = asan.moe_align_block_size(a["topk_ids"], a["num_experts"], a["block_size"])
        want = ref_permute.moe_align_block_size(a["topk_ids"], a["num_experts"],
                                                a["block_size"])
        for g, w in zip(got, want):
            assert_int_equal(g, w, msg=f"{preset}/{case.name}")


# --- grouped_topk_cuda -------------------------------------------------------------------

@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["f32", "bf16", "f16"])
def test_grouped_topk_asan(asan, config, dtype):
    E, G, tg, K, scoring, bias, gsc, renorm, scale = CONFIGS[config]
    for T in (0, 1, 37):   # 37: a last block of 4 warps with one token
        logits, b = make_inputs(T, E, dtype, "cpu", bias, seed=T * 31 + E)
        kw = kwargs_of(E, G, tg, K, scoring, b, gsc, renorm, scale)
        w, ids = asan.grouped_topk(logits, K, **kw)
        assert_same_selection(w, ids, logits, K, kw, msg=f"emulated cuda {config} T={T}")


@pytest.mark.parametrize("config", ["deepseek_v3", "e72_g8"])
def test_grouped_topk_shared_expert_asan(asan, config):
    """The shared column: the routed columns as without it (a row stride of top_k + 1, the
    last block partial), then the id with weight 1.0 in every row, nothing written past."""
    E, G, tg, K, scoring, bias, gsc, renorm, scale = CONFIGS[config]
    for T in (1, 37):
        logits, b = make_inputs(T, E, torch.bfloat16, "cpu", bias, seed=T + E)
        kw = kwargs_of(E, G, tg, K, scoring, b, gsc, renorm, scale)
        w, ids = asan.grouped_topk(logits, K, shared_expert_id=E, **kw)
        assert w.shape == ids.shape == (T, K + 1)
        assert_same_selection(w[:, :K].contiguous(), ids[:, :K].contiguous(), logits, K, kw,
                              msg=f"emulated cuda {config} T={T} shared")
        assert (ids[:, K] == E).all() and (w[:, K] == 1.0).all()


@pytest.mark.parametrize("config", ["deepseek_v3", "e72_g8", "e512_g8"])
def test_grouped_topk_tsan(tsan, config):
    E, G, tg, K, scoring, bias, gsc, renorm, scale = CONFIGS[config]
    logits, b = make_inputs(9, E, torch.bfloat16, "cpu", bias, seed=E)
    kw = kwargs_of(E, G, tg, K, scoring, b, gsc, renorm, scale)
    w, ids = tsan.grouped_topk(logits, K, **kw)
    assert_same_selection(w, ids, logits, K, kw, msg=f"emulated cuda {config}")


@pytest.mark.parametrize("preset", ["edge", "random"])   # DeepSeek-V3's: CONFIGS above
def test_grouped_topk_checker_cases(asan, preset):
    """moe-check's cases: NaN and inf rows, ties, softmax, strided and bf16 logits."""
    testing.check("grouped_topk", asan.grouped_topk, preset=preset)


# test_gating's edge cases on the emulated kernel, for the layouts the GPU run would meet
# first: every tie position of a lane's run (E = 2..40: partial last lanes), group ties on
# the shuffle path (deepseek_v3: 4 lanes a group) and the shared-memory path (the others),
# NaN / inf rows, +-inf group sums, a row stride that leaves rows unaligned for 16-byte loads.
@pytest.mark.parametrize("config", ["deepseek_v3", "deepseek_v2", "e72_g8", "g_eq_e"])
def test_grouped_topk_exact_ties_asan(asan, config):
    test_gating.test_exact_ties("cpu", asan.grouped_topk, config)


@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
def test_grouped_topk_tie_at_every_position_asan(asan, scoring):
    test_gating.test_equal_logits_tie_at_every_position("cpu", asan.grouped_topk, scoring)


@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
def test_grouped_topk_nan_inf_rows_asan(asan, scoring):
    test_gating.test_nan_inf_rows("cpu", asan.grouped_topk, scoring)


def test_grouped_topk_inf_group_scores_asan(asan):
    test_gating.test_bias_with_inf_group_scores("cpu", asan.grouped_topk)


def test_grouped_topk_row_strided_asan(asan):
    test_gating.test_row_strided_logits("cpu", asan.grouped_topk)


def test_grouped_topk_property_asan(asan):
    """test_gating's random configurations (group sizes 2..70, both group paths, exact ties),
    25 examples (an emulated call costs ~0.4 s)."""
    body = test_gating.test_property_random.hypothesis.inner_test
    run = settings(max_examples=25)(given(data=st.data())(body))
    run(device="cpu", backend=asan.grouped_topk)


@pytest.mark.parametrize("E,G,tg,K", [(256, 1, 1, 40), (1024, 8, 6, 700)])
def test_grouped_topk_top_k_past_a_warp_asan(asan, E, G, tg, K):
    """top_k > 32: the chosen ids and the weights' sum span several rounds of the output
    loop (one id a lane each)."""
    logits, b = make_inputs(5, E, torch.bfloat16, "cpu", True, seed=K)
    kw = kwargs_of(E, G, tg, K, "sigmoid", b, "top2_sum", True, 1.0)
    w, ids = asan.grouped_topk(logits, K, **kw)
    assert_same_selection(w, ids, logits, K, kw, msg=f"E={E} top_k={K}")


def test_grouped_topk_over_48kb_of_shared_memory(asan):
    """E = G = 1024: 4 warps x (4 KB of scores, 4 KB of selection scores, 8 KB of group keys
    and the chosen 8 ids), past the 48 KB a launch gets without cudaFuncSetAttribute (the
    emulator refuses it as the GPU does)."""
    E, G, tg, K = 1024, 1024, 8, 8
    logits, _ = make_inputs(6, E, torch.float32, "cpu", False, seed=3)
    kw = kwargs_of(E, G, tg, K, "sigmoid", None, "max", True, 1.0)
    w, ids = asan.grouped_topk(logits, K, **kw)
    assert_same_selection(w, ids, logits, K, kw, msg="E=G=1024, top_k=512")


# --- the emulation itself -----------------------------------------------------------------

def test_translate_rewrites_launches_and_shared_memory():
    src = ("__shared__ int32_t counts[kWarps * E];\n"
           "extern __shared__ __align__(16) unsigned char smem_raw[];\n"
           "k<id_t><<<static_cast<unsigned>(n), 256, 0, stream>>>(ids, P);\n"
           "run<<<1, 32>>>();\n")
    assert emu.translate(src).splitlines() == [
        "auto& counts = ::cuda_emu::shared<int32_t[kWarps * E]>(__LINE__);",
        "unsigned char* smem_raw = ::cuda_emu::dynamic_shared<unsigned char>();",
        "::cuda_emu::launch(k<id_t>, static_cast<unsigned>(n), 256, 0, stream)(ids, P);",
        "::cuda_emu::launch(run, 1, 32)();"]
    with pytest.raises(ValueError, match="__shared__"):
        emu.translate("__shared__ float2 tile;\n")   # a scalar: no rule for it


def test_mutant_race_is_caught_by_tsan(mutants):
    ids, E, align = ROUTINGS["partial_last_chunk"]()
    with pytest.raises(AssertionError, match="ThreadSanitizer: data race"):
        mutants["race"].permute_index(ids, E, align)


def test_mutant_out_of_bounds_is_caught_by_asan(mutants):
    ids, E, align = ROUTINGS["partial_last_chunk"]()
    with pytest.raises(AssertionError, match="AddressSanitizer: heap-buffer-overflow"):
        mutants["bounds"].permute_index(ids, E, align)
    # the driver restarts after the failure; the shared-memory opt-in is gone in this build
    logits, _ = make_inputs(2, 1024, torch.float32, "cpu", False, seed=3)
    kw = kwargs_of(1024, 1024, 8, 8, "sigmoid", None, "max", True, 1.0)
    with pytest.raises(RuntimeError, match="cudaError_t 1"):
        mutants["bounds"].grouped_topk(logits, 8, **kw)


def test_driver_runs_every_cuda_kernel_file():
    """A .cuh added to csrc/cuda/ without a driver entry would go unchecked here."""
    driver = (emu.EMU / "driver.cpp").read_text()
    kernels = sorted(p.name for p in (emu.ROOT / "csrc" / "cuda").glob("*.cuh"))
    assert kernels, "no CUDA kernel sources found"
    missing = [k for k in kernels if f'#include "cuda/{k}"' not in driver]
    assert not missing, f"tests/cuda_emu/driver.cpp does not run {missing}"
