#!/usr/bin/env bash
# One call on the GPU machine: build (CUDA kernels for sm_90a), run every test including
# the slow sweeps, run moe-bench, and leave the results in $OUT (or benchmarks/results/).
# Prints a short table last. Usage: bash benchmarks/gpu_check.sh
# (RUN_TUNE=1 adds the Triton launch-config sweeps, gating and grouped GEMM: the GEMM one
# writes moe_kernels/configs/grouped_gemm/<device>.json, copied to $OUT to commit;
# PYTEST_ARGS passes options to pytest.)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/latest}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
stamp=$(date -u +%Y%m%dT%H%M)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_')

echo "== build"; t0=$(date +%s)
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "built in $(( $(date +%s) - t0 )) s"; grep -E "registers|spill" "$OUT/build.log" | head -5

echo "== tests"
python3 -m pytest tests -q -rfE -p no:cacheprovider ${PYTEST_ARGS:-} --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
test_rc=$?
tail -15 "$OUT/tests.log"

echo "== compute-sanitizer (memcheck) on the CUDA gating kernel and the MLA paged kernel"
compute-sanitizer --tool memcheck --error-exitcode 9 python3 -c "
import torch, moe_kernels as mk
for T, E, G, tg in [(1, 256, 8, 4), (37, 72, 8, 3), (300, 384, 1, 1), (5, 1000, 8, 2)]:
    x = torch.randn(T, E, device='cuda').bfloat16()
    mk.grouped_topk(x, 8, num_expert_group=G, topk_group=tg, correction_bias=torch.zeros(E, device='cuda'), backend='cuda')
# the MLA paged kernel with block ids out of range and lengths past the table (the
# unchecked CUDA-graph path): it must read nothing out of bounds
cache = torch.randn(6, 16, 576, device='cuda').bfloat16()
w = torch.randn(4 * 256, 512, device='cuda').bfloat16()
table = torch.tensor([[0, 99, -3], [5, 2, 1]], dtype=torch.int32, device='cuda')
lens = torch.tensor([60, 40], dtype=torch.int32, device='cuda')
k = torch.empty(100, 4, 192, device='cuda').bfloat16(); v = torch.empty(100, 4, 128, device='cuda').bfloat16()
torch.ops.moe_kernels.mla_decompress_kv_paged_triton(cache, table, lens, w, None, None, k, v)
torch.cuda.synchronize(); print('memcheck run done')" > "$OUT/sanitizer.log" 2>&1
san_rc=$?; tail -3 "$OUT/sanitizer.log"

echo "== C++ exceptions on this image: which variant reaches Python (docs/index.md)"
timeout 300 python3 benchmarks/probe_cpp_exceptions.py > "$OUT/cpp_exception_probe_${gpu}_${stamp}.txt" 2>&1
cat "$OUT/cpp_exception_probe_${gpu}_${stamp}.txt"

if [ "${RUN_TUNE:-0}" = 1 ]; then  # ~1 min of device time: only when retuning
  echo "== triton tuning sweep"
  python3 benchmarks/tune_gating.py > "$OUT/tune.log" 2>&1; cat "$OUT/tune.log"
  python3 benchmarks/tune_grouped_gemm.py ${TUNE_ARGS:---quick} > "$OUT/tune_gemm.log" 2>&1
  tail -12 "$OUT/tune_gemm.log"; cp moe_kernels/configs/grouped_gemm/*.json "$OUT/" 2>/dev/null
fi

echo "== moe-bench"
python3 -m moe_kernels.bench --json "$OUT/bench_${gpu}_${stamp}.json" > "$OUT/bench.log" 2>&1
bench_rc=$?
cat "$OUT/bench.log"
echo "== summary: tests rc=$test_rc sanitizer rc=$san_rc bench rc=$bench_rc"
