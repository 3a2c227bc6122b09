"""Input-building helpers of the case generators: seeded draws and the non-contiguous
layouts an implementation must read correctly (row strides, column-major, expanded)."""

from __future__ import annotations

import torch

from moe_kernels._common import FP8


def pick(g: torch.Generator, choices: list):
    return choices[int(torch.randint(len(choices), (1,), generator=g))]


def small(g: torch.Generator, high: int, low: int = 0) -> int:
    """A size in [low, high], with the extremes (0 or low, 1, high) drawn often."""
    if bool(torch.rand(1, generator=g) < 0.3):
        return pick(g, [low, min(low + 1, high), high])
    return int(torch.randint(low, high + 1, (1,), generator=g))


def row_strided(wide: torch.Tensor, width: int) -> torch.Tensor:
    """The first `width` columns of a wider tensor: rows strided, the rest of each row
    holds other values (an implementation that assumes contiguity reads them)."""
    return wide[..., :width]


def column_major(t: torch.Tensor) -> torch.Tensor:
    """The same values stored column-major (strides (1, rows)), as DeepGEMM's scales."""
    return t.t().contiguous().t()


def expanded_rows(row: torch.Tensor, rows: int) -> torch.Tensor:
    """(rows, n) view of one row with row stride 0."""
    return row.reshape(1, -1).expand(rows, -1)


def topk_ids(g: torch.Generator, T: int, K: int, E: int, *, skipped: float = 0.0,
             device="cpu") -> torch.Tensor:
    """(T, K) int32 distinct experts per row; a fraction `skipped` of the pairs -1."""
    if T == 0:
        return torch.zeros(0, K, dtype=torch.int32, device=device)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).int()
    if skipped:
        ids = torch.where(torch.rand(T, K, generator=g) < skipped, -1, ids)
    return ids.to(device)


def fp8_weights(g: torch.Generator, shape, std: float = 0.05, device="cpu"):
    """(q, scales): FP8 128x128-block weights of a random float tensor."""
    from moe_kernels.reference import fp8 as ref_fp8
    q, s = ref_fp8.quantize_fp8_block(torch.randn(*shape, generator=g) * std)
    return q.to(device), s.to(device)


def fp8_rows(g: torch.Generator, rows: int, cols: int, device="cpu"):
    """(q, scales): FP8 1x128-group activations of random rows."""
    from moe_kernels.reference import fp8 as ref_fp8
    q, s = ref_fp8.quantize_fp8_per_token_group(torch.randn(rows, cols, generator=g))
    return q.to(device), s.to(device)


__all__ = ["FP8", "column_major", "expanded_rows", "fp8_rows", "fp8_weights", "pick",
           "row_strided", "small", "topk_ids"]
