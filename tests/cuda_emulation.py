"""The CUDA C++ kernels (csrc/cuda/*.cuh) run on the CPU, in `make test`.

CI has no GPU, so without this the CUDA kernels' logic would meet its first input on the
GPU machine. tests/cuda_emu/emulator.h emulates the runtime and device functions they use
(a worker thread per CUDA thread, barriers for __syncthreads / __syncwarp, warp
collectives through shared slots); this module rewrites the kernel sources into C++ that
header can compile, builds tests/cuda_emu/driver.cpp twice (AddressSanitizer +
UndefinedBehaviorSanitizer; ThreadSanitizer), and calls the driver with the public ops'
arguments. Builds run as session jobs (tests/session_jobs.py):
`python tests/cuda_emulation.py build {asan,tsan} DIR [MUTANT]`.

What the emulation does not replace: the GPU run (tests/test_*.py with CUDA tensors,
compute-sanitizer in benchmarks/gpu_check.sh). It checks the kernels' indexing, ranks,
scans, shared-memory sizes and barrier placement, not the GPU memory model or speed.
"""

from __future__ import annotations

import os
import pathlib
import re
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cuda_emu"
SOURCES = ("cuda", "common")   # the folders of csrc/ the driver includes
SANITIZERS = {
    "asan": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
             "-fno-omit-frame-pointer"],
    "tsan": ["-fsanitize=thread"],
}
SKIP = 77   # build exit status: this compiler lacks the sanitizer's runtime

# Deliberate bugs, each of a kind the GPU would show only as a wrong or flaky result, built
# into their own driver to prove the emulated tests catch them (tests/test_cuda_emulated.py):
# name: (sanitizer, [(file under csrc/, text, replacement)]).
MUTANTS = {
    # the per-warp counts read before every warp has written them: a shared-memory race
    "race": ("tsan", [("cuda/permute.cuh", "  __syncthreads();\n  if (e >= 0) {",
                       "  if (e >= 0) {")]),
    # the last chunk's thread p == P writes row_of_pair[P]: one past the end; and the
    # grouped_topk launch no longer opts in to over 48 KB of dynamic shared memory
    "bounds": ("asan", [("cuda/permute.cuh", "if (p >= P) return;", "if (p > P) return;"),
                        ("cuda/gating.cuh", "if (smem > 48 * 1024) {", "if (false) {")]),
}
TIMEOUT_S = 300   # one call; the slowest (ThreadSanitizer, 1024-thread scan block) takes ~1 s

# `name<T, 4><<<grid, block, smem, stream>>>(`  ->  `::cuda_emu::launch(name<T, 4>, grid, ...)(`
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
_DYNAMIC_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:]+(?:\s+[\w:]+)*?)\s+(\w+)\s*\[\s*\]\s*;")
_STATIC_SHARED = re.compile(
    r"__shared__\s+(?:__align__\(\d+\)\s+)?([\w:]+)\s+(\w+)\s*\[([^\]]+)\]\s*;")


def translate(source: str) -> str:
    """CUDA source -> C++ for tests/cuda_emu/emulator.h: launches and shared-memory
    declarations become calls; anything left that the header cannot compile raises."""
    out = _LAUNCH.sub(r"::cuda_emu::launch(\1, \2)(", source)
    out = _DYNAMIC_SHARED.sub(r"\1* \2 = ::cuda_emu::dynamic_shared<\1>();", out)
    out = _STATIC_SHARED.sub(r"auto& \2 = ::cuda_emu::shared<\1[\3]>(__LINE__);", out)
    for construct in ("<<<", "__shared__"):
        if construct in out:
            line = next(l for l in out.splitlines() if construct in l)
            raise ValueError(f"cuda_emulation: cannot translate {construct!r} in: {line.strip()}")
    return out


def _compiler() -> str | None:
    return shutil.which("g++") or shutil.which("c++")


def _mutate(sources: dict, mutant: str) -> None:
    for name, text, replacement in MUTANTS[mutant][1]:
        if sources[name].count(text) != 1:
            raise ValueError(f"mutant {mutant}: {text!r} is not once in csrc/{name}")
        sources[name] = sources[name].replace(text, replacement)


def build(sanitizer: str, out_dir: pathlib.Path, mutant: str | None = None) -> int:
    """Translates csrc/{cuda,common} (with `mutant`'s bugs, if given) into out_dir/src and
    compiles binary(sanitizer, out_dir); the exit status of the compiler, or SKIP when it
    cannot link the sanitizer at all."""
    cxx = _compiler()
    flags = ["-std=c++20", "-O1", "-g", "-pthread", *SANITIZERS[sanitizer]]
    probe = out_dir / f"probe-{sanitizer}"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "probe.cpp").write_text("int main() { return 0; }\n")
    if subprocess.run([cxx, *flags, str(out_dir / "probe.cpp"), "-o", str(probe)],
                      capture_output=True).returncode != 0:
        print(f"{cxx} cannot build with {' '.join(SANITIZERS[sanitizer])}", file=sys.stderr)
        return SKIP
    run = subprocess.run([str(probe)], capture_output=True, text=True)
    if run.returncode != 0:   # e.g. ThreadSanitizer under a kernel's address-space layout
        print(f"{sanitizer} programs do not run here: {run.stderr.strip()[:500]}",
              file=sys.stderr)
        return SKIP
    sources = {f"{folder}/{path.name}": path.read_text()
               for folder in SOURCES for path in sorted((ROOT / "csrc" / folder).iterdir())}
    if mutant is not None:
        _mutate(sources, mutant)
    src = out_dir / "src"
    for name, text in sources.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(translate(text))
    cmd = [cxx, *flags, f"-I{EMU / 'include'}", f"-I{src}", str(EMU / "driver.cpp"),
           "-o", str(binary(sanitizer, out_dir))]
    print(" ".join(cmd))
    return subprocess.run(cmd).returncode


def binary(sanitizer: str, out_dir: pathlib.Path) -> pathlib.Path:
    return out_dir / f"driver-{sanitizer}"


def build_argv(sanitizer: str, out_dir: pathlib.Path, mutant: str | None = None) -> list:
    return [sys.executable, str(pathlib.Path(__file__).resolve()), "build", sanitizer,
            str(out_dir)] + ([mutant] if mutant else [])


def available() -> str | None:
    """None, or why the emulated kernels cannot be built here."""
    return None if _compiler() else "no C++ compiler (g++ / c++) on PATH"


class Emulated:
    """The CUDA kernels through one driver process, called like the public ops (CPU tensors
    in and out). A sanitizer's report or an emulator violation ends the process and fails
    the call with its report; the next call starts a fresh process."""

    def __init__(self, driver: pathlib.Path, sanitizer: str):
        self.driver, self.sanitizer = driver, sanitizer
        self._proc = None
        self._stderr = None

    def _start(self):
        self._stderr = tempfile.TemporaryFile()
        env = {"TSAN_OPTIONS": "halt_on_error=1", "ASAN_OPTIONS": "detect_leaks=0",
               "UBSAN_OPTIONS": "print_stacktrace=1"}
        self._proc = subprocess.Popen([str(self.driver)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._stderr, env=env)

    def close(self):
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def _fail(self, why: str):
        self.close()
        self._stderr.seek(0)
        report = self._stderr.read().decode(errors="replace")
        raise AssertionError(f"emulated CUDA kernel ({self.sanitizer}): {why}\n{report[:6000]}")

    def _read(self, n: int) -> bytes:
        """n bytes of the answer, or the process's report if it ends or hangs first."""
        fd, data = self._proc.stdout.fileno(), bytearray()
        deadline = time.monotonic() + TIMEOUT_S
        while len(data) < n:
            ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                self._fail(f"no answer within {TIMEOUT_S} s (a barrier that never completes?)")
            chunk = os.read(fd, n - len(data))
            if not chunk:
                self._proc.wait()
                self._fail(f"the driver exited {self._proc.returncode}")
            data += chunk
        return bytes(data)

    def _call(self, ints, payload: bytes, shapes):
        if self._proc is None:
            self._start()
        try:
            self._proc.stdin.write(struct.pack(f"<{len(ints)}q", *ints) + payload)
            self._proc.stdin.flush()
        except BrokenPipeError:
            self._proc.wait()
            self._fail(f"the driver exited {self._proc.returncode}")
        sizes = [int(np.prod(shape)) * np.dtype(dtype).itemsize for dtype, shape in shapes]
        data = self._read(8 + sum(sizes))
        error = struct.unpack_from("<q", data)[0]
        if error != 0:
            raise RuntimeError(f"emulated CUDA launch failed: cudaError_t {error}")
        outs, at = [], 8
        for (dtype, shape), size in zip(shapes, sizes):
            arr = np.frombuffer(data, dtype=dtype, count=size // np.dtype(dtype).itemsize,
                                offset=at)
            outs.append(torch.from_numpy(arr.copy()).reshape(shape))
            at += size
        return outs

    def _index(self, topk_ids, num_experts, align, vllm):
        from moe_kernels.reference.permute import permuted_rows
        ids = topk_ids.contiguous()
        wide = ids.dtype == torch.int64
        P, E = ids.numel(), num_experts
        R = permuted_rows(P, E, align)
        ints = [1, P, E, align, int(wide), int(vllm), R]
        payload = ids.numpy().astype(np.int64 if wide else np.int32).tobytes()
        if vllm:
            shapes = [(np.int32, (R,)), (np.int32, (-(-R // align),)), (np.int64, (E + 1,))]
        else:
            shapes = [(np.int64, (E + 1,)), (np.int32, (E,)), (np.int32, (R,)),
                      (np.int32, tuple(ids.shape)), (np.int32, (R,))]
        return self._call(ints, payload, shapes)

    def permute_index(self, topk_ids, num_experts, align):
        """-> (expert_offsets (E+1,) int64, tokens_per_expert (E,) int32, m_indices (R,)
        int32, row_of_pair (T, K) int32, pair_of_row (R,) int32), as permute_index_cuda."""
        return tuple(self._index(topk_ids, num_experts, align, vllm=False))

    def moe_align_block_size(self, topk_ids, num_experts, block_size):
        """-> (sorted_token_ids (R,), expert_ids (ceil(R / bs),), num_tokens_post_padded
        (1,)) int32, as moe_align_block_size_cuda."""
        sorted_ids, expert_ids, offsets = self._index(topk_ids, num_experts, block_size, True)
        return sorted_ids, expert_ids, offsets[-1:].int()

    def grouped_topk(self, logits, top_k, *, num_expert_group=1, topk_group=1,
                     scoring_func="sigmoid", correction_bias=None, group_scoring=None,
                     renormalize=True, routed_scaling_factor=1.0, shared_expert_id=None):
        """-> (topk_weights (T, W) float32, topk_ids (T, W) int32), W = top_k (+ 1 with a
        shared expert), the arguments as moe_kernels.grouped_topk's (already valid)."""
        if group_scoring is None:
            group_scoring = "top2_sum" if correction_bias is not None else "max"
        T, E = logits.shape
        dtype = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[logits.dtype]
        stride = logits.stride(0) if T > 1 else E
        # the rows as the kernel reads them: (T-1) * stride + E elements from the first
        flat = logits.as_strided(((T - 1) * stride + E,) if T else (0,), (1,))
        payload = flat.contiguous().view(torch.uint8).numpy().tobytes()
        if correction_bias is not None:
            payload += correction_bias.float().contiguous().numpy().tobytes()
        scale_bits = struct.unpack("<I", struct.pack("<f", routed_scaling_factor))[0]
        ints = [2, T, E, stride, dtype, num_expert_group, topk_group, top_k,
                int(scoring_func == "softmax"), int(group_scoring == "top2_sum"),
                int(topk_group < num_expert_group), int(bool(renormalize)),
                int(correction_bias is not None), scale_bits,
                -1 if shared_expert_id is None else shared_expert_id]
        W = top_k + (shared_expert_id is not None)
        w, ids = self._call(ints, payload, [(np.float32, (T, W)), (np.int32, (T, W))])
        return w, ids


if __name__ == "__main__":
    args = sys.argv[1:]
    if (len(args) not in (3, 4) or args[0] != "build" or args[1] not in SANITIZERS
            or args[3:] and args[3] not in MUTANTS):
        sys.exit(f"usage: {sys.argv[0]} build {{{','.join(SANITIZERS)}}} DIR "
                 f"[{'|'.join(MUTANTS)}]")
    sys.exit(build(args[1], pathlib.Path(args[2]), *args[3:]))
