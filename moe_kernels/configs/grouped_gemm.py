"""Tile configs of the FP8 grouped GEMMs, per kind and shape bucket.

A bucket is the number of rows per expert (contiguous, segments: R / E; masked: M):
decode buckets want a small BLOCK_M and many N tiles (the weights are the traffic),
prefill buckets big tiles. `benchmarks/tune_grouped_gemm.py` measures candidates on the
GPU and writes `grouped_gemm/<device name>.json`:

    {"device": ..., "triton": ..., "torch": ..., "configs": {
        "contiguous": [{"max_m": 16, "BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4,
                        "num_stages": 4, "tma": false}, ...], "segments": [...],
        "masked": [...]}}

`tma` (optional, default false): the fp8 operand tiles load through TMA descriptors
instead of per-thread `cp.async` addresses, where the operands allow it (16-byte aligned
base and strides; else the same tile loads through pointers). `maxnreg` (optional): a
cap on registers per thread; 128 lets two 8-warp blocks share an SM (65536 registers),
which the 64x128 and 128x64 TMA tiles reach without spilling (sm_90a report).

`ws` (optional, contiguous and segments kinds, default false): the bucket runs the
warp-specialised Gluon kernel (triton/grouped_gemm.py; a 128 x 128 tile whatever the
bucket's, sm_90 only) where the operands allow TMA, else the bucket's own tile.

Without a file for the device, `DEFAULTS` apply (chosen from the sm_90a compile report,
not yet timed: docs/fp8.md). A tile of BLOCK_M < 64 runs with A and B swapped
(triton/grouped_gemm.py). Under the Triton interpreter the tile size only changes the run
time.
"""

from __future__ import annotations

import functools
import json
import pathlib
import re

import torch

from moe_kernels._library import triton_interpreting

KINDS = ("contiguous", "segments", "masked")
CONFIG_DIR = pathlib.Path(__file__).parent / "grouped_gemm"

# Chosen from the sm_90a compile report (registers and spills per tile, `moe-bench
# --sm90-report`), not yet timed on a GPU. Decode tiles (BLOCK_M < 64) run with A and B
# swapped, so the 64-row wgmma side holds weights. 64-row tiles take 8 warps: at 4 warps
# the contiguous kernel spills (two float32 tiles per thread: partial + accumulator). Its
# loop over the experts of a tile costs ~80 registers more than the other two,
# so its prefill tile is 128x64 (207 registers; 128x128 spills with a float32 output).
_DECODE = {"max_m": 16, "BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 4}
_SMALL = {"max_m": 64, "BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 8, "num_stages": 4}
DEFAULTS = {
    "contiguous": [_DECODE, _SMALL, {"max_m": None, "BLOCK_M": 128, "BLOCK_N": 64,
                                     "num_warps": 8, "num_stages": 4}],
    "segments": [_DECODE, _SMALL, {"max_m": None, "BLOCK_M": 128, "BLOCK_N": 128,
                                   "num_warps": 8, "num_stages": 4}],
    "masked": [_DECODE, _SMALL, {"max_m": None, "BLOCK_M": 128, "BLOCK_N": 128,
                                 "num_warps": 8, "num_stages": 4}],
}
# Interpreter: numpy per program, so fewer, larger tiles are faster; one swapped (decode)
# and one plain tile so that tests run both code paths, and BLOCK_N < 128 so that they
# cover a scale block split over two tiles.
_INTERPRETER_BUCKETS = [{"max_m": 16, "BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1},
                        {"max_m": None, "BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}]


def device_file(name: str) -> pathlib.Path:
    return CONFIG_DIR / (re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") + ".json")


@functools.lru_cache(maxsize=None)
def _table(device_index: int) -> dict:
    path = device_file(torch.cuda.get_device_name(device_index))
    if path.exists():
        table = json.loads(path.read_text())["configs"]
        return {kind: table.get(kind, DEFAULTS[kind]) for kind in KINDS}
    return DEFAULTS


def pick(buckets: list[dict], m: int) -> dict:
    """The first bucket whose max_m >= m (None: no bound)."""
    for b in buckets:
        if b["max_m"] is None or m <= b["max_m"]:
            return b
    return buckets[-1]


def all_tables() -> dict[str, dict]:
    """Every config table an op can pick from: "defaults", their TMA variants (what the
    tuner weighs against them) and each tuned device file."""
    tables = {"defaults": DEFAULTS, "defaults+tma": with_tma(DEFAULTS),
              "defaults+tma+maxnreg128": with_tma(DEFAULTS, maxnreg=128),
              "defaults+ws": with_ws(DEFAULTS)}
    for path in sorted(CONFIG_DIR.glob("*.json")):
        configs = json.loads(path.read_text())["configs"]
        tables[path.stem] = {kind: configs.get(kind, DEFAULTS[kind]) for kind in KINDS}
    return tables


_FORCED: list[dict] = []


def with_table(table: dict, fn, *args):
    """fn(*args) with `table` in force on every device (the sm_90a compile gate runs the
    launch wrappers on meta tensors once per table; the tuner times candidates; the tests
    run the TMA variant of the table in force, `tma_table`)."""
    _FORCED.append(table)
    try:
        return fn(*args)
    finally:
        _FORCED.pop()


def table_in_force(device: torch.device) -> dict:
    """The table `gemm_config` picks from on `device`."""
    if _FORCED:
        return _FORCED[-1]
    if triton_interpreting():
        return {kind: _INTERPRETER_BUCKETS for kind in KINDS}
    if device.type != "cuda":       # meta tensors: compiling for the GPU without one
        return DEFAULTS
    return _table(device.index if device.index is not None else 0)


def with_tma(table: dict, maxnreg: int | None = None) -> dict:
    """table with every tile loading through TMA descriptors; maxnreg: the register cap
    of its 8-warp tiles of at most 64 x 128 (those that fit 2 blocks per SM with it)."""
    def variant(b):
        fits = b["num_warps"] == 8 and b["BLOCK_M"] * b["BLOCK_N"] <= 64 * 128
        return dict(b, tma=True, **({"maxnreg": maxnreg} if maxnreg and fits else {}))
    return {kind: [variant(b) for b in buckets] for kind, buckets in table.items()}


def with_ws(table: dict) -> dict:
    """table with every contiguous and segments bucket on the warp-specialised kernels."""
    return dict(table, **{kind: [dict(b, ws=True) for b in table[kind]]
                          for kind in ("contiguous", "segments")})


def tma_table(device: torch.device) -> dict:
    """The table in force on `device`, every tile loading through TMA descriptors."""
    return with_tma(table_in_force(device))


def gemm_config(kind: str, m: int, device: torch.device) -> dict:
    """Launch config (BLOCK_M, BLOCK_N, num_warps, num_stages, optional tma) for `kind` at
    `m` rows per expert (buckets by m; one table per device)."""
    return pick(table_in_force(device)[kind], m)
