"""Tile configs of the FP8 grouped GEMMs, per kind and shape bucket.

A bucket is the number of rows per expert (contiguous, segments: R / E; masked: M):
decode buckets want a small BLOCK_M and many N tiles (the weights are the traffic),
prefill buckets big tiles. `benchmarks/tune_grouped_gemm.py` measures candidates on the
GPU and writes `grouped_gemm/<device name>.json`:

    {"device": ..., "triton": ..., "torch": ..., "configs": {
        "contiguous": [{"max_m": 16, "BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4,
                        "num_stages": 4}, ...], "segments": [...], "masked": [...]}}

Without a file for the device, `DEFAULTS` apply (chosen by reasoning, not measured: see
docs/fp8.md). Under the Triton interpreter the tile size only changes the run time.
"""

from __future__ import annotations

import functools
import json
import pathlib
import re

import torch

KINDS = ("contiguous", "segments", "masked")
CONFIG_DIR = pathlib.Path(__file__).parent / "grouped_gemm"

_DEFAULT_BUCKETS = [
    {"max_m": 16, "BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 4},
    {"max_m": 64, "BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 4},
    {"max_m": None, "BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 4},
]
DEFAULTS = {kind: _DEFAULT_BUCKETS for kind in KINDS}
# Interpreter: numpy per program, so fewer, larger tiles are faster; still < 128 in N so
# tests cover a scale block split over two tiles.
_INTERPRETER = {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}


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


def gemm_config(kind: str, m: int, N: int, K: int, device: torch.device) -> dict:
    """Launch config (BLOCK_M, BLOCK_N, num_warps, num_stages) for `kind` at `m` rows per
    expert. N and K are accepted for buckets keyed on them later; unused today."""
    if device.type != "cuda":
        return _INTERPRETER
    return pick(_table(device.index if device.index is not None else 0)[kind], m)
