#!/usr/bin/env bash
# Builds the whole extension, CUDA kernels included (sm_90a), against the GPU machine's
# torch (2.11.0+cu130) on a machine without a GPU, then runs the CPU test suite under that
# torch and triton 3.6: what the GPU run would otherwise find first, at no device time.
# Needs nvcc 13 and the package index (the torch wheel is ~530 MB, its CUDA libraries
# ~3 GB; cuBLAS / cuSPARSE headers come with them). Not part of CI.
# Usage: bash benchmarks/cuda_build_check.sh [pytest args...]
#   WORK (default /tmp/moe_kernels_cuda_check): the venv, a toolkit view and the worktree
#   PYTHON (default python3): the interpreter of the venv (the GPU machine's is 3.12)
#   CARRY=1: also leave the built .so in moe_kernels/ with its stamp, for the GPU run to
#            carry instead of building (benchmarks/carried_build.py)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/moe_kernels_cuda_check}
TORCH=${TORCH:-torch==2.11.0}
# The toolkit: $CUDA_HOME, else /usr/local/cuda, else where nvcc lives (a wrapper script
# on PATH would point elsewhere, hence the fixed places first).
toolkit=${CUDA_HOME:-}
[ -n "$toolkit" ] || { [ -x /usr/local/cuda/bin/nvcc ] && toolkit=/usr/local/cuda; }
[ -n "$toolkit" ] || toolkit=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
[ -x "$toolkit/bin/nvcc" ] || { echo "cuda_build_check: no CUDA toolkit (nvcc) found"; exit 2; }
mkdir -p "$WORK"
if [ ! -x "$WORK/venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$WORK/venv"
  # numpy < 2.4: triton 3.6's interpreter converts 1-element arrays with int(), which
  # numpy 2.4 refuses (the compiled kernels on the GPU do not care)
  "$WORK/venv/bin/pip" install -q "$TORCH" "numpy<2.4" pybind11 ninja "setuptools<82" wheel \
    pytest hypothesis safetensors
fi
PY=$WORK/venv/bin/python
# A toolkit view: the local nvcc and its headers, plus the CUDA library headers torch's
# own CUDA headers include (shipped with torch's nvidia-* wheels).
home=$WORK/cuda_home
libs=$("$PY" -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'include'))")
rm -rf "$home" && mkdir -p "$home/include"
ln -s "$toolkit/bin" "$home/bin"
[ -d "$toolkit/lib64" ] && ln -s "$toolkit/lib64" "$home/lib64"
for f in "$toolkit"/include/* "$libs"/*; do
  [ -e "$home/include/$(basename "$f")" ] || ln -s "$f" "$home/include/"
done
# A copy of the working tree (tracked and untracked files, nothing ignored), so that this
# build touches nothing here.
tree=$WORK/tree
rm -rf "$tree" && mkdir -p "$tree"
git ls-files -co --exclude-standard -z | tar --null -cf - -T - | tar -xf - -C "$tree"
echo "== build against $("$PY" -c 'import torch; print(torch.__version__)')"
(cd "$tree" && CUDA_HOME=$home MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py build_ext --inplace \
   > "$WORK/build.log" 2>&1) || { tail -40 "$WORK/build.log"; exit 1; }
grep -E "moe_kernels: building|warning" "$WORK/build.log" | grep -v avx512fintrin | head -20
(cd "$tree" && "$PY" -c "from moe_kernels import _library as l; \
   assert l.extension_has_cuda(), 'extension built without CUDA'; print('extension with CUDA loads')")
if [ "${CARRY:-0}" = 1 ]; then
  so=$(ls "$tree"/moe_kernels/_C*.so)
  cp "$so" moe_kernels/ && "$PY" benchmarks/carried_build.py write "$so"
fi
echo "== CPU tests under this torch and triton"
(cd "$tree" && PYTHONPATH=$tree "$PY" -m pytest tests -q -m "not slow" -p no:cacheprovider \
   --deselect tests/test_sm90_compile.py "$@")
