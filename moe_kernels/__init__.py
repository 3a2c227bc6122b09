"""moe_kernels: Triton and C++/CUDA kernels for the hot path of DeepSeek-V3-style MoE.

Every op takes `backend=None | "reference" | "triton" | "cpu" | "cuda"`; None picks the
best available for the input's device. See docs/index.md.
"""

from moe_kernels._library import (BACKENDS, BackendUnavailableError, available_backends,
                                  extension_has_cuda, extension_loaded)
from moe_kernels import eplb
from moe_kernels.layer import DeepseekV3MoE
from moe_kernels.ops.expert_parallel import EPHandle, ExpertPlacement, ep_combine, ep_dispatch
from moe_kernels.ops.fp8 import (dequantize_fp8_block, quantize_fp8_block,
                                 quantize_fp8_per_token_group, silu_and_mul_quant_fp8)
from moe_kernels.ops.fused_moe import fused_moe_fp8
from moe_kernels.ops.gating import grouped_topk, update_correction_bias_
from moe_kernels.ops.grouped_gemm import grouped_gemm_fp8, grouped_gemm_fp8_masked
from moe_kernels.ops.mla import mla_decompress_kv, mla_decompress_kv_paged, mla_pack_kv_b_proj
from moe_kernels.ops.permute import (MaskedLayout, PermuteLayout, moe_align_block_size,
                                     permute, permute_masked, unpermute)
from moe_kernels._library import register_non_differentiable

register_non_differentiable()

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "extension_has_cuda",
    "extension_loaded",
    "grouped_topk",
    "update_correction_bias_",
    "MaskedLayout",
    "PermuteLayout",
    "moe_align_block_size",
    "permute",
    "permute_masked",
    "unpermute",
    "quantize_fp8_per_token_group",
    "quantize_fp8_block",
    "dequantize_fp8_block",
    "silu_and_mul_quant_fp8",
    "grouped_gemm_fp8",
    "grouped_gemm_fp8_masked",
    "fused_moe_fp8",
    "mla_decompress_kv",
    "mla_decompress_kv_paged",
    "mla_pack_kv_b_proj",
    "DeepseekV3MoE",
    "ExpertPlacement",
    "EPHandle",
    "ep_dispatch",
    "ep_combine",
    "eplb",
]
