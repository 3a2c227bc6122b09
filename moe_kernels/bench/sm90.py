"""The sm_90a compile gate: every Triton kernel the ops launch, compiled for the H100 on any
machine (no GPU needed), and what the compiled code looks like.

How: the ops' own host wrappers (`moe_kernels/triton/*`) run on **meta tensors** at
DeepSeek-V3 shapes, so each launch goes through the kernel's own argument binder with the
launch's real constexprs, dtypes, integer specialisations and launch options; a stand-in
driver reports an sm_90 target and `JITFunction.run` compiles instead of launching. Every
launch configuration the ops can pick is reached by choosing the shapes (decode and prefill
buckets, every dtype variant) and by running once per grouped-GEMM config table (the
defaults and each tuned `configs/grouped_gemm/*.json`).

Each compiled kernel is read: registers and spills (the ptxas log of the compile itself),
shared memory, every dot (wgmma or mma.sync, operand dtype, operands from shared memory or
registers), how operands reach shared memory (async copy, TMA, or a register round trip),
the waits inside the main loop, the SASS instructions of one main-loop pass, and the
kernel's global loads and stores by width (tests/test_sm90_compile.py holds the
memory-bound kernels to 16-byte accesses).

`python -m moe_kernels.bench.sm90` (or `moe-bench --sm90-report`) prints the table and
exits 1 on a violation of the gate (`violations`); tests/test_sm90_compile.py runs it
under each triton version the project supports.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

SHARED_LIMIT = 232448          # bytes of shared memory one H100 block can use (227 KiB)
WGMMA_MIN_ROWS = 64            # a wgmma tile is 64 rows per warp group
TENSOR_CORE_DTYPES = ("f8E4M3FN", "bf16", "f16")

META = torch.device("meta")


# --- compiling without a GPU ---------------------------------------------------------------

@dataclasses.dataclass
class Launch:
    """One compiled launch: which op case asked for it and what came out."""
    case: str
    kernel: str
    config: str
    compiled: object = None
    error: str | None = None
    ptxas_log: str = ""
    seconds: float = 0.0


class _StubDriver:
    """Answers the few questions `JITFunction.run` asks the driver, for an sm_90 target."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return META


def _config_text(kwargs: dict) -> str:
    parts = []
    for k, v in kwargs.items():
        if isinstance(v, (bool, int, float, str)) or type(v).__name__ == "dtype":
            parts.append(f"{k}={v}")
    return " ".join(parts)


@contextlib.contextmanager
def sm90_target(sink: list, case: list):
    """Within: every `kernel[grid](...)` compiles for sm_90a and appends a `Launch` to sink
    (case[0] names the op case running); nothing is launched."""
    from triton import knobs
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    real_run = JITFunction.run
    logs: dict[int, str] = {}     # a kernel reused from the in-memory cache keeps its log

    def compile_only(self, *args, grid, warmup, **kwargs):
        out = io.StringIO()
        start = time.perf_counter()
        launch = Launch(case[0], self.fn.__name__, _config_text(kwargs))
        try:
            with contextlib.redirect_stdout(out):
                launch.compiled = real_run(self, *args, grid=grid, warmup=True, **kwargs)
            logs.setdefault(id(launch.compiled), out.getvalue())
            launch.ptxas_log = logs[id(launch.compiled)]
        except Exception as exc:     # a compile error is a finding, not a crash of the gate
            launch.error = f"{type(exc).__name__}: {exc}"[-2000:]
        launch.seconds = time.perf_counter() - start
        sink.append(launch)
        return launch.compiled

    saved = (knobs.nvidia.dump_ptxas_log, knobs.cache.dir, driver._active)
    with tempfile.TemporaryDirectory(prefix="moe_kernels_sm90_") as cache_dir:
        # a fresh cache: a cached kernel would skip ptxas and so print no register log
        knobs.nvidia.dump_ptxas_log = True
        knobs.cache.dir = cache_dir
        driver.set_active(_StubDriver())
        JITFunction.run = compile_only
        try:
            yield sink
        finally:
            JITFunction.run = real_run
            knobs.nvidia.dump_ptxas_log, knobs.cache.dir, driver._active = saved


# --- the launches of every op, at DeepSeek-V3 shapes: `sm90_cases()` of each op's bench
# module (moe_kernels/bench/<op>.py) ------------------------------------------------------

def case_families():
    """The `sm90_cases` generators of the bench modules: (name, launch) pairs."""
    from moe_kernels.bench import MODULES
    return [m.sm90_cases for m in MODULES if hasattr(m, "sm90_cases")]


def compile_all(select: str | None = None) -> list[Launch]:
    """Runs every op case (those whose name contains `select`) under `sm90_target`."""
    sink: list[Launch] = []
    case = [""]
    with sm90_target(sink, case):
        for family in case_families():
            for name, run in family():
                if select and select not in name:
                    continue
                case[0] = name
                try:
                    run()
                except Exception as exc:   # host code failing on meta tensors: report it
                    sink.append(Launch(name, "<host>", "", error=f"{type(exc).__name__}: {exc}"))
    return sink


def launched_kernels() -> set[str]:
    """Names of every `*_kernel` JITFunction in moe_kernels.triton: the kernels the ops
    launch (helpers called from kernels have other names)."""
    return {name for name, _ in _jit_functions() if name.endswith("_kernel")}


def _jit_functions():
    from triton.runtime.jit import JITFunction

    from moe_kernels.triton.launch import CachedLaunch, package_globals
    for module, name, obj in package_globals():
        if isinstance(obj, CachedLaunch):      # a kernel behind triton/launch.py's cache
            obj = obj.jit
        if isinstance(obj, JITFunction) and obj.__module__ == module.__name__:
            yield name, obj


def uncalled_helpers() -> set[str]:
    """JIT helpers (not `*_kernel`) that no other JIT function names (calls, or hands on:
    a partition to `gl.warp_specialize`, a combine function to a scan): a kernel launched
    under another name would hide from the gate, so there must be none."""
    functions = list(_jit_functions())
    sources = {name: inspect.getsource(fn.fn) for name, fn in functions}
    return {name for name, _ in functions if not name.endswith("_kernel")
            and not any(re.search(rf"\b{name}\b", src)
                        for other, src in sources.items() if other != name)}


# --- reading the compiled code ---------------------------------------------------------------

_TYPE = re.compile(r"(?:tensor|!ttg\.memdesc)<(\d+)x(\d+)x(\w+)")


@dataclasses.dataclass
class Dot:
    kind: str           # "wgmma" | "mma" (mma.sync / FMA)
    m: int
    n: int
    dtype: str          # operand element type
    a_from: str         # "shared" | "registers"
    b_from: str


def _dots(ttgir: str) -> list[Dot]:
    dots = []
    for line in ttgir.splitlines():
        if " = ttng.warp_group_dot " in line or " = tt.dot " in line:
            sig = line.rsplit(" : ", 1)[1]
            operands, result = sig.split(" -> ")
            a_type, b_type = operands.split(" * ")
            m, n, _ = _TYPE.search(result).groups()
            dots.append(Dot("wgmma" if "warp_group_dot" in line else "mma", int(m), int(n),
                            _TYPE.search(a_type).group(3),
                            "shared" if "memdesc" in a_type else "registers",
                            "shared" if "memdesc" in b_type else "registers"))
    return dots


def _loop_bodies(ttgir: str) -> list[str]:
    """Text of every scf.for region (outer loops include their inner ones)."""
    lines = ttgir.splitlines()
    bodies = []
    for i, line in enumerate(lines):
        if "scf.for" in line and line.rstrip().endswith("{"):
            depth, j = 0, i
            while j < len(lines):
                depth += lines[j].count("{") - lines[j].count("}")
                if depth <= 0:
                    break
                j += 1
            bodies.append("\n".join(lines[i:j + 1]))
    return bodies


def _mainloop(ttgir: str) -> str:
    """The innermost loop that holds a dot ("" when no loop does)."""
    with_dot = [b for b in _loop_bodies(ttgir) if "_dot " in b or "tt.dot " in b]
    return min(with_dot, key=len) if with_dot else ""


def _operand_path(loop: str, ttgir: str = "") -> str:
    """How the main loop's dot operands reach shared memory (in a warp-specialised
    kernel, the copies may be another partition's)."""
    paths = []
    if "async_tma_copy_global_to_local" in loop or "tt.descriptor_load" in loop:
        paths.append("TMA")
    if "async_copy_global_to_local" in loop.replace("async_tma_copy_global_to_local", ""):
        paths.append("cp.async")
    if re.search(r"ttg\.local_alloc %|ttg\.local_store ", loop):
        paths.append("registers")
    if not paths and "ttg.warp_specialize" in ttgir and "async_tma_copy_global_to_local" in ttgir:
        paths.append("TMA by a producer partition")
    return "+".join(paths) or "-"


@functools.lru_cache(maxsize=None)
def _sass(cubin: bytes) -> str | None:
    """The kernel's SASS (nvdisasm), or None where nvdisasm cannot run. Once per cubin: a
    launch that reuses a compiled kernel (28 of the gate's 148) would pay nvdisasm's 0.4 s
    again."""
    from triton import knobs
    try:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            return subprocess.run([knobs.nvidia.nvdisasm.path, "-c", f.name], check=True,
                                  capture_output=True, text=True).stdout
    except Exception:
        return None


_GLOBAL_ACCESS = re.compile(r"(?<![A-Z])(LDG|STG)((?:\.[A-Z0-9_]+)*)(?![A-Z])")
_ACCESS_BITS = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}


def _global_access(sass: str) -> dict[str, dict[int, int]]:
    """{"LDG": {bits: count}, "STG": {...}}: the kernel's global loads and stores by width
    (memory-bound kernels want their data path at 128 bits: 16-byte accesses). The width
    is the opcode's size modifier, 32 bits without one; cache and eviction modifiers may
    stand beside it."""
    out: dict[str, dict[int, int]] = {"LDG": {}, "STG": {}}
    for op, modifiers in _GLOBAL_ACCESS.findall(sass):
        sizes = [_ACCESS_BITS[m] for m in modifiers.split(".") if m in _ACCESS_BITS]
        bits = sizes[0] if sizes else 32
        out[op][bits] = out[op].get(bits, 0) + 1
    return out


def _sass_mainloop(sass: str | None) -> dict | None:
    """SASS instructions, tensor-core ops and waits of the innermost loop holding a
    tensor-core op."""
    if sass is None:
        return None
    code = [ln for ln in sass.splitlines() if re.match(r"\s*(/\*[0-9a-f]+\*/)?\s+[@A-Z]", ln)
            or re.match(r"^\.L\w+:", ln.strip())]
    labels, instr = {}, []
    for ln in code:
        s = ln.strip()
        if s.endswith(":") and s.startswith(".L"):
            labels[s[:-1]] = len(instr)
        else:
            instr.append(s)
    best = None
    for i, ins in enumerate(instr):
        m = re.search(r"BRA\s+`?\(?(\.L\w+)", ins)
        if m and labels.get(m.group(1), i + 1) <= i:
            body = instr[labels[m.group(1)]:i + 1]
            tensor_core = any("GMMA" in x or "HMMA" in x for x in body)
            if tensor_core and (best is None or len(body) < len(best)):
                best = body
    if best is None:
        return None
    # QGMMA: wgmma with fp8 operands, HGMMA: 16-bit; WARPGROUP.DEPBAR waits for them
    return {"instructions": len(best), "wgmma": sum("GMMA" in x for x in best),
            "hmma": sum("HMMA" in x for x in best),
            "waits": sum("WARPGROUP.DEPBAR" in x for x in best),
            "global_loads": sum(" LDG" in x for x in best)}


def analyse(launch: Launch) -> dict:
    """What the compiled code of one launch looks like (a JSON-able dict)."""
    row = {"case": launch.case, "kernel": launch.kernel, "config": launch.config,
           "error": launch.error, "seconds": round(launch.seconds, 2)}
    k = launch.compiled
    if k is None:
        return row
    log = launch.ptxas_log
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    ttgir, ptx = k.asm["ttgir"], k.asm["ptx"]
    loop = _mainloop(ttgir)
    waits = [int(p) for p in re.findall(r"warp_group_dot_wait .*?pendings = (\d+)", loop)]
    sass = _sass(k.asm["cubin"])
    row.update(
        registers=int(regs.group(1)) if regs else None,
        spill_bytes=(int(spills.group(1)) + int(spills.group(2))) if spills else None,
        shared=int(k.metadata.shared),
        num_warps=k.metadata.num_warps, num_stages=k.metadata.num_stages,
        dots=[dataclasses.asdict(d) for d in _dots(ttgir)],
        operand_path=_operand_path(loop, ttgir) if loop else "-",
        loop_waits=waits,
        tma="cp.async.bulk.tensor" in ptx,
        sass_loop=_sass_mainloop(sass) if loop else None,
        global_access=_global_access(sass) if sass is not None else None)
    return row


def violations(row: dict) -> list[str]:
    """Why a compiled launch fails the gate (empty when it passes)."""
    if row.get("error"):
        lines = [ln.strip() for ln in row["error"].splitlines() if ln.strip()]
        return [f"compile error: {lines[0][:120]} ... {lines[-1][:300]}"]
    out = []
    if row["spill_bytes"] is None:
        out.append("no ptxas register report")
    elif row["spill_bytes"] > 0:
        out.append(f"spills {row['spill_bytes']} B")
    if row["shared"] > SHARED_LIMIT:
        out.append(f"shared memory {row['shared']} B > {SHARED_LIMIT}")
    for d in row["dots"]:
        if d["dtype"] in TENSOR_CORE_DTYPES and d["m"] >= WGMMA_MIN_ROWS:
            if d["kind"] != "wgmma":
                out.append(f"{d['m']}x{d['n']} {d['dtype']} dot is not wgmma")
            elif d["dtype"] == "f8E4M3FN" and (d["a_from"], d["b_from"]) != ("shared", "shared"):
                out.append(f"{d['m']}x{d['n']} fp8 wgmma reads operands from registers")
    # an fp8 x fp8 dot needs no conversion, so its operands must not detour through
    # registers (a mixed-dtype dot converts one operand in registers by necessity)
    fp8_wgmma = any(d["kind"] == "wgmma" and d["dtype"] == "f8E4M3FN" for d in row["dots"])
    if fp8_wgmma and "registers" in row["operand_path"]:
        out.append("fp8 wgmma operands go through registers before shared memory")
    return out


# --- report ----------------------------------------------------------------------------------

def _dot_text(row: dict) -> str:
    dots = {(d["kind"], d["m"], d["n"], d["dtype"], d["a_from"][0] + d["b_from"][0])
            for d in row.get("dots", [])}
    return ",".join(f"{k} {m}x{n} {dt} {src}" for k, m, n, dt, src in sorted(dots)) or "-"


def _access_text(row: dict) -> str:
    access = row.get("global_access")
    if not access:
        return "-"
    part = lambda widths: " ".join(f"{b}x{n}" for b, n in sorted(widths.items(), reverse=True))
    return f"{part(access['LDG']) or '-'} / {part(access['STG']) or '-'}"


def markdown(rows: list[dict], meta: dict) -> str:
    head = ("case", "kernel", "config", "regs", "spill B", "smem B", "dots (operands: s=shared, "
            "r=registers)", "operand path", "loop waits", "TMA", "SASS/loop",
            "global loads / stores (bits x count)", "gate")
    lines = [f"# sm_90a compile report: triton {meta['triton']}, torch {meta['torch']}, "
             f"commit {meta['commit']}", "",
             f"{meta['launches']} launches, {meta['kernels']} kernels, "
             f"{meta['failures']} failing the gate; compiled in {meta['seconds']:.0f} s.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        sass = r.get("sass_loop")
        sass_text = (f"{sass['instructions']} ({sass['wgmma'] or sass['hmma']} "
                     f"{'wgmma' if sass['wgmma'] else 'mma'}, {sass['waits']} waits, "
                     f"{sass['global_loads']} LDG)") if sass else "-"
        bad = violations(r)
        cells = (r["case"], r["kernel"], r["config"].replace("|", "/"), r.get("registers", "-"),
                 r.get("spill_bytes", "-"), r.get("shared", "-"), _dot_text(r),
                 r.get("operand_path", "-"), ",".join(map(str, r.get("loop_waits", []))) or "-",
                 "yes" if r.get("tma") else "no", sass_text, _access_text(r),
                 "; ".join(bad) or "ok")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def report(select: str | None = None) -> tuple[list[dict], dict]:
    import triton
    start = time.perf_counter()
    launches = compile_all(select)
    rows = [analyse(x) for x in launches]
    from moe_kernels.bench.cli import _git_commit
    meta = {"triton": triton.__version__, "torch": torch.__version__, "commit": _git_commit(),
            "launches": len(rows), "kernels": len({r["kernel"] for r in rows}),
            "failures": sum(bool(violations(r)) for r in rows),
            "seconds": time.perf_counter() - start,
            "covered": sorted({r["kernel"] for r in rows if r["kernel"] != "<host>"}),
            "launched_kernels": sorted(launched_kernels()),
            "uncalled_helpers": sorted(uncalled_helpers())}
    return rows, meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="moe-bench --sm90-report", description=__doc__.split("\n")[0])
    p.add_argument("--json", metavar="PATH", help="write every launch's analysis as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the report table as Markdown")
    p.add_argument("--select", help="only op cases whose name contains this text")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("sm90 report: unset TRITON_INTERPRET (the interpreter compiles nothing)")
    rows, meta = report(args.select)
    table = markdown(rows, meta)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "launches": rows}, f, indent=1)
    for r in rows:
        bad = violations(r)
        status = "FAIL " + "; ".join(bad) if bad else "ok"
        print(f"{r['kernel']:<24} {r.get('registers', '-')!s:>4} regs "
              f"{r.get('spill_bytes', '-')!s:>5} B spill  {r['case']}: {status}")
    missing = set(meta["launched_kernels"]) - set(meta["covered"])
    print(f"sm90: triton {meta['triton']}: {meta['launches']} launches of {meta['kernels']} "
          f"kernels in {meta['seconds']:.0f} s, {meta['failures']} failing; kernels without a "
          f"compile case: {sorted(missing) or 'none'}; uncalled helpers: "
          f"{meta['uncalled_helpers'] or 'none'}")
    return 1 if meta["failures"] or missing or meta["uncalled_helpers"] else 0


if __name__ == "__main__":
    sys.exit(main())
