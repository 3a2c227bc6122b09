"""Float32 PyTorch reference for MLA latent KV decompression: the oracle.

DeepSeek MLA caches per token a latent c_kv (kv_lora_rank = 512) and a RoPE'd key part
k_pe (rope_dim = 64). The checkpoint weight kv_b_proj (H * (dn + dv), R) holds, per head h,
W_UK_h = rows [h*(dn+dv), h*(dn+dv) + dn) then W_UV_h = the next dv rows. Then

    k[t, h] = concat(c_kv[t] @ W_UK_h.T, k_pe[t])      (dn + rope_dim)
    v[t, h] = c_kv[t] @ W_UV_h.T                        (dv)

The paged form reads c_kv | k_pe rows (R + rope_dim wide) of sequence b at position p from
kv_cache[block_table[b, p // block_size], p % block_size]; output tokens are sequence 0's,
then sequence 1's, ...; rows past sum(seq_lens) (when num_tokens is larger) are zeros.
"""

from __future__ import annotations

import torch

from moe_kernels._common import FP8, without_autocast
from moe_kernels.reference.fp8 import dequantize_fp8_block



def unpack_kv_b_proj(packed: torch.Tensor) -> torch.Tensor:
    """The packed form of mla_pack_kv_b_proj, (N / 16, R / 32, 16, 32) bf16 whose
    [j, c, p, 2 q + e] is row 16 j + q, column 32 c + 2 p + e -> the (N, R) rows."""
    J, C = packed.shape[:2]
    return packed.view(J, C, 16, 16, 2).permute(0, 3, 1, 2, 4).reshape(16 * J, 32 * C)


def weight_rows(kv_b_proj: torch.Tensor, kv_b_proj_scale: torch.Tensor | None) -> torch.Tensor:
    """kv_b_proj as (N, R) rows: the checkpoint's, or unpacked from the 4-D packed form."""
    return unpack_kv_b_proj(kv_b_proj) if kv_b_proj.dim() == 4 else kv_b_proj


def up_projection(kv_b_proj: torch.Tensor, kv_b_proj_scale: torch.Tensor | None,
                  num_heads: int, dn: int, dv: int):
    """kv_b_proj (H*(dn+dv), R) bf16/fp16/fp32, or fp8 with 128x128 block scales, or packed
    (mla_pack_kv_b_proj, times the block scales when given) -> W_UK (H, dn, R),
    W_UV (H, dv, R) float32."""
    kv_b_proj = weight_rows(kv_b_proj, kv_b_proj_scale)
    if kv_b_proj.dtype == FP8 or kv_b_proj_scale is not None:
        w = dequantize_fp8_block(kv_b_proj, kv_b_proj_scale, 128, 128, torch.float32)
    else:
        # contiguous: torch's float32 matmul sums in another order for a stride-0 weight
        # (1 ulp apart), and the oracle must not depend on its inputs' layout
        w = kv_b_proj.float().contiguous()
    w = w.view(num_heads, dn + dv, w.shape[-1])
    return w[:, :dn], w[:, dn:]


@without_autocast
def mla_decompress_kv(kv_c: torch.Tensor, k_pe: torch.Tensor, kv_b_proj: torch.Tensor,
                      kv_b_proj_scale: torch.Tensor | None, num_heads: int, dn: int, dv: int,
                      out_dtype: torch.dtype):
    """kv_c (T, R), k_pe (T, rope_dim) float -> k (T, H, dn + rope_dim), v (T, H, dv) in
    out_dtype, computed in float32."""
    w_uk, w_uv = up_projection(kv_b_proj, kv_b_proj_scale, num_heads, dn, dv)
    c = kv_c.float().contiguous()
    k_nope = torch.einsum("tr,hdr->thd", c, w_uk)
    v = torch.einsum("tr,hdr->thd", c, w_uv)
    pe = k_pe.float()[:, None, :].expand(-1, num_heads, -1)
    return torch.cat([k_nope, pe], dim=-1).to(out_dtype), v.to(out_dtype)


def paged_token_slots(block_table: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int,
                      block_size: int) -> torch.Tensor:
    """(num_tokens,) int64 flat cache slot (block * block_size + offset) of each output
    token; -1 for tokens past sum(seq_lens), beyond the block table or with a negative
    block id."""
    t = torch.arange(num_tokens, device=seq_lens.device)
    B, max_blocks = block_table.shape
    if B == 0 or max_blocks == 0:
        return torch.full_like(t, -1)
    lens = seq_lens.long()
    ends = torch.cumsum(lens, 0)
    seq = torch.searchsorted(ends, t, right=True)   # the first sequence ending after t
    valid = seq < B
    seq = seq.clamp(max=B - 1)
    pos = t - (ends - lens)[seq]
    idx = pos // block_size
    valid &= idx < max_blocks
    blocks = block_table.long()[seq, idx.clamp(max=max_blocks - 1)]
    return torch.where(valid & (blocks >= 0), blocks * block_size + pos % block_size, -1)


def gather_paged_rows(kv_cache: torch.Tensor, block_table: torch.Tensor,
                      seq_lens: torch.Tensor, num_tokens: int, kv_cache_scale):
    """kv_cache (num_blocks, block_size, D) bf16/fp16/fp32 or fp8 (real = fp8 * scale, a
    float, a 0-dim float32 tensor, or None for 1) ->
    (num_tokens, D) float32 rows in output order, zeros past sum(seq_lens)."""
    nb, bs, D = kv_cache.shape
    slots = paged_token_slots(block_table, seq_lens, num_tokens, bs)
    if nb * bs == 0:
        return kv_cache.new_zeros((num_tokens, D), dtype=torch.float32)
    flat = kv_cache.reshape(nb * bs, D)
    if kv_cache.dtype == FP8:   # rows move as bytes (Inductor cannot index fp8)
        rows = flat.view(torch.uint8)[slots.clamp(0, nb * bs - 1)].view(FP8).float()
        rows = rows * (1.0 if kv_cache_scale is None else kv_cache_scale)
    else:
        rows = flat[slots.clamp(0, nb * bs - 1)].float()
    return torch.where(((slots >= 0) & (slots < nb * bs))[:, None], rows, 0.0)


@without_autocast
def mla_decompress_kv_paged(kv_cache: torch.Tensor, block_table: torch.Tensor,
                            seq_lens: torch.Tensor, kv_b_proj: torch.Tensor,
                            kv_b_proj_scale: torch.Tensor | None, kv_cache_scale,
                            num_heads: int, dn: int, dv: int, num_tokens: int,
                            out_dtype: torch.dtype):
    """Paged form: rows gathered and dequantized in float32, then mla_decompress_kv."""
    rows = gather_paged_rows(kv_cache, block_table, seq_lens, num_tokens, kv_cache_scale)
    R = weight_rows(kv_b_proj, kv_b_proj_scale).shape[1]
    return mla_decompress_kv(rows[:, :R], rows[:, R:], kv_b_proj, kv_b_proj_scale, num_heads,
                             dn, dv, out_dtype)
