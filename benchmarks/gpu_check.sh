#!/usr/bin/env bash
# One call on the GPU machine, sized for one 10-minute command (a session's device time is
# about 15 minutes, the machine's start included). Stages, in order of what a short run
# must not miss:
#   build      the extension with the CUDA kernels for sm_90a (ninja, all cores), unless
#              a build carried with the call stands in for it (benchmarks/carried_build.py)
#   ws         the warp-specialised GEMMs probed apart (moe_kernels/bench/ws_probe.py: their
#              first run can hang), once for the call's processes, which read its verdict
#   warm       one untimed call of each of bench's rows of ours, two processes per op module
#              at once (moe-bench --warm): Triton compiles them on all cores into its cache
#              on disk, from which bench then loads them instead of compiling one by one
#   bench      moe-bench on defaults without torch.compile: every op, ours, torch eager,
#              the torch-native peers, the eager-call rows (its JSON is rewritten after
#              every op, so a stopped run keeps its rows)
#   tests      the CUDA tests (-k "$TEST_SELECT"), not the slow ones, in parallel (xdist);
#              verbose, so that a stage stopped by its limit still names what failed
#   sanitizer  compute-sanitizer memcheck over every kernel family (sanitize_cuda.py)
#   compile    the torch.compile rows (moe-bench --only-compile: ~20 Inductor compiles),
#              merged into the bench JSON at the end
#   slow       the GPU's slow tests, one at a time: the int64 sweeps (several GB each)
#              first, then the direct calls of every Triton variant
#   probe      which C++ exceptions reach Python on this image (its six extension builds
#              take a minute; the variant of our own extension answers at once)
#   ncu        (not by default) Nsight Compute's speed-of-light and occupancy sections of
#              each op's kernels at the goal shapes (benchmarks/ncu_cases.py; NCU_CASES
#              picks cases): what limits a kernel that misses its goal
# Each stage gets at most its cap and what is left of BUDGET_S, and writes its log to $OUT
# when it ends; a stage that runs out of time says so, and one that brings the host's free
# memory under MIN_AVAIL_MB is stopped (state low-mem). The bench rows and a line per stage
# are printed last. Usage: bash benchmarks/gpu_check.sh
# A machine that stops answering returns nothing of its call, so a lend of ~15 minutes is
# safer spent as two calls back to back (the machine stays warm for ~30 s between them),
# each carrying the build, sharing one STAMP:
#   STAMP=<s> STAGES="build ws warm bench" BUDGET_S=300 bash benchmarks/gpu_check.sh
#   STAMP=<s> STAGES="build ws tests sanitizer slow compile" BUDGET_S=390 bash ...
# (the second call's ws stage reads the first's verdict where the machine is still warm;
# the first call's 300 s hold the ws probe and warm stages before bench's cap, and the
# second's 390 its tests and sanitizer caps with the ws probe again on a fresh machine)
#   BUDGET_S (default 540)    total seconds for all stages
#   MIN_AVAIL_MB              host memory (MB) a stage must leave free (default 1/16 of it)
#   STAMP                     the UTC stamp in the file names (default: now)
#   STAGES                    stages to run (default: "build ws warm bench tests
#                             sanitizer compile slow probe")
#   TEST_SELECT               pytest -k of the tests stage (default: "(cuda or nccl) and
#                             not emulated": CPU emulation of the CUDA kernels runs in CI)
#   SLOW_SELECT               the same for the slow stage (default: "(cuda or gpu) and not
#                             emulated": the slow CPU tests run off the device)
#   STALL_TIMEOUT_S           an op module of bench that goes this long without a row
#                             checked or timed ends its process (default 90; compile, whose
#                             rows are Inductor compiles, twice that); TEST_TIMEOUT_S the
#                             same for a test (default 180: a first test compiles)
#   RESUME_BENCH              a bench JSON of an earlier call (put into the tree first): the
#                             bench stage goes on with it (moe-bench --resume: the modules
#                             it finished or that failed there are skipped, one that its
#                             time limit interrupted runs again)
#   PYTEST_ARGS               more pytest options for tests and slow
#   BENCH_ARGS                more moe-bench options for bench and compile (e.g. --op NAME)
#   RUN_TUNE=1                adds the Triton launch-config sweeps after bench (gating, MLA:
#                             printed; grouped GEMM: writes
#                             moe_kernels/configs/grouped_gemm/<device>.json, copied to $OUT
#                             to commit; run with fewer stages: $OUT returns 8 files at most)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/latest}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} MAX_JOBS=${MAX_JOBS:-16}
BUDGET_S=${BUDGET_S:-540}
MIN_AVAIL_MB=${MIN_AVAIL_MB:-$(awk '/^MemTotal:/ {print int($2 / 1024 / 16)}' /proc/meminfo)}
STAGES=${STAGES:-build ws warm bench tests sanitizer compile slow probe}
TEST_SELECT=${TEST_SELECT:-(cuda or nccl) and not emulated}
export SLOW_SELECT=${SLOW_SELECT:-(cuda or gpu) and not emulated}
stamp=${STAMP:-$(date -u +%Y%m%dT%H%M)}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_')
start=$(date +%s)
summary=()

# run_stage NAME CAP_S LOG COMMAND...: COMMAND under min(CAP_S, time left), its output
# appended to LOG (stages may share a file: $OUT returns 8 files at most).
run_stage() {
  local name=$1 cap=$2 log=$3; shift 3
  local left=$(( BUDGET_S - ($(date +%s) - start) ))
  local limit=$(( cap < left ? cap : left ))
  if (( limit < 15 )); then
    summary+=("$(printf '%-10s %-9s %5s  %s' "$name" "no time" "-" "budget spent")"); return
  fi
  echo "== $name (at most ${limit} s)"
  local t0=$(date +%s) tmp=$(mktemp)
  timeout -k 10 "$limit" "$@" > "$tmp" 2>&1 &
  local pid=$!
  watch_memory "$pid" "$tmp.mem" &
  local watcher=$!
  wait "$pid"
  local rc=$? took=$(( $(date +%s) - t0 )) state
  kill "$watcher" 2>/dev/null; wait "$watcher" 2>/dev/null
  if grep -q killed "$tmp.mem" 2>/dev/null; then state=low-mem
  elif [ $rc = 0 ]; then state=ok
  elif [ $rc = 124 ] || [ $rc = 137 ]; then state=timeout
  else state="rc=$rc"; fi
  local low="host memory free >= $(head -1 "$tmp.mem" 2>/dev/null) MB"
  { echo "===== $name: $state in ${took} s ($low; GPU after: $(gpu_state)): $*"
    cat "$tmp"; } >> "$log"
  summary+=("$(printf '%-10s %-9s %4ss  %s' "$name" "$state" "$took" "$(stage_line "$name" "$tmp")")")
  rm -f "$tmp" "$tmp.mem"
  echo "   $state in ${took} s ($low)"
}

# watch_memory PID FILE: the host's lowest MemAvailable (MB) while PID runs, kept in FILE;
# under MIN_AVAIL_MB it stops the stage (timeout passes the TERM to the stage's process
# group) and says so in FILE. A machine that runs out of memory stops answering and
# returns nothing of the call, so a stage that grows too large is ended instead.
watch_memory() {
  local pid=$1 file=$2 low=0 avail
  while kill -0 "$pid" 2>/dev/null; do
    avail=$(awk '/^MemAvailable:/ {print int($2 / 1024)}' /proc/meminfo)
    if (( low == 0 || avail < low )); then low=$avail; echo "$low" > "$file"; fi
    if (( avail < MIN_AVAIL_MB )); then
      echo killed >> "$file"; kill -TERM "$pid" 2>/dev/null; return
    fi
    sleep 1
  done
}

# The GPU's memory in use and its active throttle reasons: a stage that leaves memory
# behind or a device in a bad state shows here.
gpu_state() {
  nvidia-smi --query-gpu=memory.used,clocks_throttle_reasons.active --format=csv,noheader \
    2>&1 | head -1
}

# One line of a stage's output that says how it went.
stage_line() {
  case $1 in
    build) grep -E "^carried_build:|moe_kernels: (building|CUDA kernels skipped)" "$2" | tr "\n" " " ;;
    # slow: its two passes' summaries
    tests|slow) grep -E "^=+ .*(passed|failed|error|skipped|no tests ran).* in [0-9.]+s" "$2" \
                  | tail -"$([ "$1" = slow ] && echo 2 || echo 1)" | tr "\n" " " \
                  | grep . || echo "$(grep -c ' PASSED' "$2") passed, $(grep -c ' FAILED' "$2") \
failed before it was stopped" ;;
    sanitizer) { grep -E "ERROR SUMMARY" "$2"; grep -E "^sanitize_cuda:" "$2"; } | tr '\n' ' ' ;;
    probe) grep -E "^variant" "$2" | awk '{print $2 ":" ($5 == "" ? "rc" $4 : $5)}' | tr '\n' ' ' ;;
    ncu) grep -c '"Duration"' "$2" | sed 's/$/ kernels profiled/' ;;
    bench|compile) grep -E "results disagree|modules that failed|WARNING" "$2" | cut -c1-100 | tr "\n" " " ;;
    ws) grep -E "^ws probe: " "$2" | tail -1 | cut -c1-200 ;;
    warm) grep -E "^moe-bench --warm: " "$2" | tail -1 | cut -c1-200 ;;
  esac
}

have_xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
bench_json="$OUT/bench_${gpu}_${stamp}.json"
compile_json="$OUT/bench_compile_${gpu}_${stamp}.json"
bench_log="$OUT/bench_${gpu}_${stamp}.txt"
tests_log="$OUT/tests_${gpu}_${stamp}.txt"
# A kernel that hangs, crashes or breaks the CUDA context on its first run costs its own
# op module's rows (moe-bench --supervise: a fresh process goes on, resuming the JSON) or
# its own test (tests/fault_guard.py: the stuck or broken worker exits, xdist starts
# another), not the rest of the stage.
# The warp-specialised kernels' first run is probed once, apart, before their rows and
# tests (moe_kernels/bench/ws_probe.py); the verdict file spans this call's processes and a
# second call with the same STAMP on a machine still warm.
stall=${STALL_TIMEOUT_S:-90}
ws_verdict="${TMPDIR:-/tmp}/moe_kernels_ws_probe_${stamp}"
export MOE_KERNELS_TEST_TIMEOUT_S=${TEST_TIMEOUT_S:-180} MOE_KERNELS_FAULT_LOG=$tests_log \
  MOE_KERNELS_WS_PROBE_FILE=$ws_verdict

for stage in $STAGES; do
  case $stage in
    build) run_stage build 240 "$OUT/build_${stamp}.log" bash -c \
             "python3 benchmarks/carried_build.py check || python3 setup.py build_ext --inplace"
           [ -n "$(ls moe_kernels/_C*.so 2>/dev/null)" ] || { tail -40 "$OUT/build_${stamp}.log"; break; } ;;
    # the ws kernels' probe, once for the call's processes (their first run can hang)
    ws)    run_stage ws 150 "$OUT/build_${stamp}.log" python3 -m moe_kernels.bench.ws_probe \
             --verdict ;;
    warm)  run_stage warm 120 "$bench_log" python3 -m moe_kernels.bench --no-compile --warm \
             ${BENCH_ARGS:-} ;;
    bench) resume=""
           if [ -n "${RESUME_BENCH:-}" ]; then cp "$RESUME_BENCH" "$bench_json" && resume=--resume; fi
           run_stage bench 210 "$bench_log" python3 -m moe_kernels.bench --no-compile \
             --supervise --stall-timeout "$stall" $resume --json "$bench_json" ${BENCH_ARGS:-}
           if [ "${RUN_TUNE:-0}" = 1 ]; then
             # the grouped GEMMs' quick sweep: ~90 configs, compiled first in 8 processes
             run_stage tune 300 "$OUT/tune_${stamp}.log" bash -c "python3 benchmarks/tune_gating.py && \
               python3 benchmarks/tune_mla.py && \
               python3 benchmarks/tune_grouped_gemm.py ${TUNE_ARGS:---quick}"
             cp moe_kernels/configs/grouped_gemm/*.json "$OUT/" 2>/dev/null
           fi ;;
    compile) run_stage compile 240 "$bench_log" python3 -m moe_kernels.bench --only-compile \
             --supervise --stall-timeout $(( 2 * stall )) --json "$compile_json" ${BENCH_ARGS:-} ;;
    tests) run_stage tests 200 "$tests_log" \
             python3 -m pytest tests -v -rfE --tb=short -p no:cacheprovider -m "not slow" \
             -k "$TEST_SELECT" $have_xdist ${PYTEST_ARGS:-} ;;
    # the GPU's slow tests alone (-k "$SLOW_SELECT"; the CPU's, the int64 cases of the C++
    # kernels and the interpreter's sweeps, run off the device: make test-all), the int64
    # sweeps first: the direct calls on the GPU compile for minutes and go last
    slow)  run_stage slow 120 "$tests_log" bash -c '
             slow() { python3 -m pytest tests -v -rfE --tb=short -p no:cacheprovider -m slow \
                        -k "$1" ${PYTEST_ARGS:-}; local rc=$?; [ $rc = 5 ] && rc=0; return $rc; }
             slow "($SLOW_SELECT) and int64_addressing"; first=$?
             slow "($SLOW_SELECT) and not int64_addressing"; second=$?
             exit $(( first || second ))' ;;
    # without torch's caching allocator each tensor is its own allocation, so that memcheck
    # sees an access past a tensor's end (inside a pooled block it would be legal memory)
    sanitizer) run_stage sanitizer 120 "$OUT/sanitizer_${gpu}_${stamp}.txt" \
             env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
             --error-exitcode 9 python3 benchmarks/sanitize_cuda.py ;;
    probe) run_stage probe 100 "$OUT/cpp_exception_probe_${gpu}_${stamp}.txt" \
             python3 benchmarks/probe_cpp_exceptions.py ;;
    ncu)   run_stage ncu 240 "$OUT/ncu_${gpu}_${stamp}.csv" ncu --profile-from-start off \
             --section SpeedOfLight --section Occupancy --csv python3 benchmarks/ncu_cases.py \
             ${NCU_CASES:-} ;;
    *) echo "gpu_check: unknown stage $stage"; exit 2 ;;
  esac
done

# The compile pass's rows go into the bench JSON (one file per run to commit), then the
# rows, condensed, with ours over eager and over compile per case.
[ -f "$bench_json" ] && python3 - "$bench_json" "$compile_json" <<'EOF'
import json, os, sys
bench, extra = sys.argv[1], sys.argv[2]
data = json.load(open(bench))
if os.path.exists(extra):
    data["results"] += json.load(open(extra))["results"]
    json.dump(data, open(bench, "w"), indent=1)
    os.remove(extra)
rows = data["results"]
base = {}
for r in rows:
    base.setdefault((r["op"], r["case"]), {})[r["backend"]] = r["time_us"]
ratio = lambda ref, t: f"{ref / t:.2f}x" if ref and t > 0 else "-"
print(f"{'op':24s} {'case':40s} {'backend':20s} {'us':>9s} {'GB/s':>7s} {'TFLOPS':>6s} "
      f"{'%roof':>5s} {'/eager':>6s} {'/comp':>6s} ok")
for r in rows:
    ok = {None: "-", True: "yes", False: "NO"}[r["correct"]]
    t = r["time_us"]
    us = f"{t:.2f}" if t > 0 else r["note"][:30]
    b = base[(r["op"], r["case"])]
    print(f"{r['op'][:24]:24s} {r['case'][:40]:40s} {r['backend'][:20]:20s} {us:>9s} "
          f"{r['gbps']:7.1f} {r['tflops']:6.1f} {r['roofline_pct']:5.1f} "
          f"{ratio(b.get('torch-eager'), t):>6s} {ratio(b.get('torch-compile'), t):>6s} {ok}")
EOF
# the goals judged (docs/benchmarks.md), kept beside the bench rows
[ -f "$bench_json" ] && python3 -m moe_kernels.bench --targets "$bench_json" | tee -a "$bench_log"
echo "== gpu_check on $gpu at $(git rev-parse --short HEAD 2>/dev/null), $(( $(date +%s) - start )) s"
[ -f "$ws_verdict" ] && summary+=("$(printf '%-10s %s' ws-probe "$(head -c 200 "$ws_verdict")")")
printf '%s\n' "${summary[@]}"
