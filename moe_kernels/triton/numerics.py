"""Rounding that the Triton interpreter gets wrong, done in software under it.

Measured with triton 3.9 (TRITON_INTERPRET=1, numpy underneath): the float32 -> e4m3 cast
truncates subnormals and drops the carry of a round-up (31.06 -> 16, 0.0306 -> 0.0156);
the float32 -> bfloat16 cast truncates (513 of 1024 random values one ulp off); the
e4m3 -> float32 cast reads the NaN patterns 0x7F / 0xFF as +-480. The GPU
rounds to nearest even in both. Kernels call these helpers with SOFTWARE =
SOFTWARE_ROUNDING (a constexpr: False on the GPU, where the hardware cast is used), so
interpreter tests check the GPU's numerics.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moe_kernels._library import triton_interpreting

SOFTWARE_ROUNDING = triton_interpreting()


@triton.jit
def _round_half_even(y):
    # exact for 0 <= y < 2**22 in IEEE float32 (the interpreter's numpy arithmetic)
    return (y + 8388608.0) - 8388608.0


@triton.jit
def fp8_e4m3_bits(x, SOFTWARE: tl.constexpr):
    """float32 (already clamped to +-448) -> e4m3fn bit pattern as uint8, round to
    nearest even."""
    if SOFTWARE:
        a = tl.abs(x)
        bits = a.to(tl.int32, bitcast=True)
        exp = (bits >> 23) - 127
        mant = bits & 0x7FFFFF
        top = mant >> 20
        rest = mant & 0xFFFFF
        up = (rest > 0x80000) | ((rest == 0x80000) & ((top & 1) == 1))
        normal = ((exp + 7) << 3) + top + up.to(tl.int32)     # a carry moves into exp
        # steps of 2**-9 below 2**-6 (the where keeps inf / NaN out of the int cast)
        subnormal = _round_half_even(tl.where(a < 1.0, a, 0.0) * 512.0).to(tl.int32)
        mag = tl.where(exp >= -6, normal, subnormal)
        mag = tl.where(x != x, 0x7F, mag)                     # NaN
        return (mag | tl.where(x < 0, 0x80, 0)).to(tl.uint8)
    else:
        return x.to(tl.float8e4nv).to(tl.uint8, bitcast=True)


@triton.jit
def round_for_store(x, DTYPE: tl.constexpr, SOFTWARE: tl.constexpr):
    """float32 x about to be stored as DTYPE: under the interpreter, rounded to the nearest
    even bfloat16 first (its truncating store is then exact)."""
    if SOFTWARE and DTYPE == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    else:
        return x


@triton.jit
def fp8_e4m3_value(bits, SOFTWARE: tl.constexpr):
    """e4m3fn bit patterns (uint8) -> float32; NaN for 0x7F / 0xFF."""
    if SOFTWARE:
        v = bits.to(tl.int32)
        em = v & 0x7F
        normal = (((v & 0x80) << 24) | ((em << 20) + (120 << 23))).to(tl.float32, bitcast=True)
        sub = em.to(tl.float32) * 0.001953125                  # exponent 0: m * 2**-9
        # the sign as a bit, not a negation: triton 3.6 negates as 0 - x, so 0x80 gave +0
        sub = (sub.to(tl.int32, bitcast=True) | ((v & 0x80) << 24)).to(tl.float32, bitcast=True)
        mag = tl.where(em < 8, sub, normal)
        return tl.where(em == 0x7F, float("nan"), mag)
    else:
        return bits.to(tl.float8e4nv, bitcast=True).to(tl.float32)
