"""Worker of tests/test_direct_calls.py, run in its own process (a kernel that crashes
must fail the test with the case that did it, not end the session).

For every op with a C++ kernel: valid arguments, then each argument mutated alone in every
way the schema's type allows (dtype, rank, each size to 0 / 1 / +1, non-contiguous layouts,
stride 0, sparse, mkldnn, meta and fake tensors, junk values; ints to 0 / -1 / 2^40;
floats to NaN / inf; None for optional tensors and tensors for None). Each case calls the
C++ check `_C.<op>_<backend>_check` and then the registered op
`torch.ops.moe_kernels.<op>`, and holds them to the contract of csrc/checks.h (backend
"cpu"; also "cuda", with the samples on the GPU, where there is one and the extension has
CUDA kernels):
- the check never throws;
- when it reports a problem, the op raises exactly that error (ValueError or TypeError,
  "<op>: <message>") and the C++ entry point is never called;
- when it reports none, the entry point runs and does not throw.
Prints `case <backend> <op> [<sample>] <case>` before each case, then `ok` or
`FAIL <backend> <op> [<sample>] <case>: <why>`, and `done` at the end.
"""

from __future__ import annotations

import os
import sys

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import moe_kernels  # noqa: F401  (registers the ops)
from helpers import non_strided
from moe_kernels import _library
from moe_kernels.ops import mla as mla_ops

FP8 = torch.float8_e4m3fn
I32 = torch.int32
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, FP8, torch.int32,
          torch.int64, torch.bool, torch.uint8)


def _gen():
    return torch.Generator().manual_seed(0)


def _ids(T, K, E, g):
    return torch.randint(-1, E, (T, K), generator=g, dtype=I32)


def _fp8(*shape, g):
    return (torch.randn(*shape, generator=g) * 4).to(FP8)


def _permute_samples(g):
    ids = _ids(3, 2, 8, g)
    index = _library.OPS["permute_index"].op("cpu")(ids, 8, 1)
    row_of_pair, pair_of_row = index[3], index[4]
    R = pair_of_row.shape[0]
    x, eo, w = torch.randn(3, 8, generator=g), torch.randn(R, 8, generator=g), torch.rand(3, 2)
    return {
        "permute_index": [(ids, 8, 4)],
        "permute_masked_index": [(ids, 8, 4)],
        "moe_align_block_size": [(ids, 8, 4)],
        "gather_rows": [(x, pair_of_row, row_of_pair)],
        "gather_rows_out": [(x, pair_of_row, row_of_pair, torch.empty(R, 8))],
        "gather_rows_quant_fp8": [(x, pair_of_row, row_of_pair, 128, 1e-10)],
        "unpermute": [(eo, row_of_pair, w)],
        "unpermute_out": [(eo, row_of_pair, w, torch.empty(3, 8))],
    }


def _fp8_samples(g):
    x, gated = torch.randn(4, 256, generator=g), torch.randn(4, 512, generator=g)
    masked_m = torch.tensor([1, 2], dtype=I32)
    w = torch.randn(2, 130, 260, generator=g)
    return {
        "quantize_fp8_per_token_group": [(x, 128, 1e-10, False, False)],
        "quantize_fp8_per_token_group_out": [(x, 128, 1e-10, False, torch.empty(4, 256, dtype=FP8),
                                              torch.empty(4, 2))],
        "silu_and_mul_quant_fp8": [(gated, 128, 1e-10)],
        "silu_and_mul_quant_fp8_out": [(gated, 128, 1e-10, torch.empty(4, 256, dtype=FP8),
                                        torch.empty(4, 2))],
        "silu_and_mul_quant_fp8_masked": [(gated.view(2, 2, 512), masked_m, 128, 1e-10)],
        "silu_and_mul_quant_fp8_masked_out": [
            (gated.view(2, 2, 512), masked_m, 128, 1e-10, zero_fill,
             torch.empty(2, 2, 256, dtype=FP8), torch.empty(2, 2, 2))
            for zero_fill in (True, False)],
        "quantize_fp8_block": [(w, 128, 128, 1e-10)],
        "dequantize_fp8_block": [(_fp8(130, 260, g=g), torch.rand(2, 3), 128, 128,
                                  torch.bfloat16)],
    }


def _gemm_samples(g):
    b, b_s = _fp8(3, 64, 256, g=g), torch.rand(3, 1, 2)
    a, a_s = _fp8(6, 256, g=g), torch.rand(6, 2)
    m_indices = torch.tensor([0, 0, 2, -1, 1, 2], dtype=I32)
    am, am_s, masked_m = _fp8(3, 4, 256, g=g), torch.rand(3, 4, 2), torch.tensor([4, 0, 2],
                                                                                 dtype=I32)
    ids = torch.tensor([[0, 2], [2, 1], [0, 2]], dtype=I32)
    offsets, counts = _library.OPS["permute_index"].op("cpu")(ids, 3, 1)[:2]
    # E = 3 experts, H = 256, I = 32 (w13 (3, 64, 256), w2 (3, 256, 32))
    fused = (torch.randn(3, 256, generator=g).to(torch.bfloat16), b, b_s, _fp8(3, 256, 32, g=g),
             torch.rand(3, 2, 1), torch.rand(3, 2), ids)
    return {
        "grouped_gemm_fp8_segments": [(a, a_s, b, b_s, offsets, counts, torch.bfloat16)],
        "grouped_gemm_fp8": [(a, a_s, b, b_s, m_indices, torch.bfloat16)],
        "grouped_gemm_fp8_out": [(a, a_s, b, b_s, m_indices,
                                  torch.empty(6, 64, dtype=torch.bfloat16))],
        "grouped_gemm_fp8_masked": [(am, am_s, b, b_s, masked_m, torch.bfloat16)],
        "grouped_gemm_fp8_masked_out": [(am, am_s, b, b_s, masked_m, zero_fill,
                                         torch.empty(3, 4, 64, dtype=torch.bfloat16))
                                        for zero_fill in (True, False)],
        "fused_moe_fp8": [fused],
        "fused_moe_fp8_out": [(*fused, torch.empty(3, 256, dtype=torch.bfloat16))],
    }


def _mla_samples(g):
    # H = 2 heads, dn = dv = 16, R = 64, rope = 16: a weight of 64 rows, packable (32 | N, R)
    w = torch.randn(64, 64, generator=g).to(torch.bfloat16)
    w8, w8_s = _fp8(64, 64, g=g), torch.rand(1, 1)
    packed = mla_ops.pack_kv_b_proj_tiles(w)
    kv_c = torch.randn(5, 64, generator=g).to(torch.bfloat16)
    k_pe = torch.randn(5, 16, generator=g).to(torch.bfloat16)
    outs = lambda T: (torch.empty(T, 2, 32, dtype=torch.bfloat16),  # noqa: E731
                      torch.empty(T, 2, 16, dtype=torch.bfloat16))
    cache = torch.randn(4, 4, 80, generator=g).to(torch.bfloat16)
    table = torch.tensor([[0, 2, 3], [1, -1, -1]], dtype=I32)
    lens = torch.tensor([5, 3], dtype=I32)
    return {
        "mla_decompress_kv": [(kv_c, k_pe, w, None, *outs(5)),
                              (kv_c, k_pe, w8, w8_s, *outs(5)),
                              (kv_c, k_pe, packed, None, *outs(5))],
        "mla_decompress_kv_paged": [(cache, table, lens, w, None, None, *outs(8)),
                                    (cache.to(FP8), table, lens, w8, w8_s, torch.tensor(0.5),
                                     *outs(8)),
                                    (cache, table, lens, packed, None, None, *outs(8))],
    }


def samples() -> dict[str, list[tuple]]:
    g = _gen()
    logits, bias = torch.randn(3, 16, generator=g), torch.randn(16, generator=g)
    out = {
        "grouped_topk": [(logits, bias, 4, 4, 2, "sigmoid", "top2_sum", True, 2.5, -1),
                         (logits, None, 2, 1, 1, "softmax", "max", False, 1.0, 16)],
        "map_to_slots": [(_ids(3, 2, 4, g), torch.randint(0, 8, (4, 2), dtype=I32),
                          torch.tensor([1, 2, 2, 1], dtype=I32), 5)],
    }
    for part in (_permute_samples, _fp8_samples, _gemm_samples, _mla_samples):
        out.update(part(g))
    return out


# --- mutations ---------------------------------------------------------------------------

def _convert(t: torch.Tensor, dtype) -> torch.Tensor:
    return t.to(torch.float32).to(dtype) if t.dtype != torch.bool else t.to(dtype)


def _resized(t: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """t with dim `dim` of size n: its values where both have them, zeros elsewhere."""
    shape = list(t.shape)
    shape[dim] = n
    out = torch.zeros(shape, dtype=t.dtype, device=t.device)
    keep = min(n, t.shape[dim])
    out.narrow(dim, 0, keep).copy_(t.narrow(dim, 0, keep))
    return out


def _every_other(t: torch.Tensor) -> torch.Tensor:
    """t's values with a last-dimension stride of 2 (junk between them)."""
    wide = _resized(t, -1, 2 * t.shape[-1]).fill_(7) if t.dtype != torch.bool else \
        _resized(t, -1, 2 * t.shape[-1])
    view = wide[..., ::2]
    view.copy_(t)
    return view


def _filled(t: torch.Tensor, value) -> torch.Tensor:
    return torch.full(t.shape, value, dtype=torch.float32, device=t.device).to(t.dtype)


def tensor_mutations(t: torch.Tensor):
    for dtype in DTYPES:
        if dtype != t.dtype:
            yield f"dtype {dtype}", _convert(t, dtype)
    yield "unsqueezed", t.unsqueeze(0)
    if t.dim() >= 1:
        yield "one dim fewer", (t.select(0, 0) if t.shape[0] else
                                t.new_zeros(t.shape[1:]))
        yield "flattened", t.reshape(-1)
    for d in range(t.dim()):
        for n in {0, 1, t.shape[d] + 1, 2 * t.shape[d] + 3} - {t.shape[d]}:
            yield f"size[{d}] {n}", _resized(t, d, n)
    if t.dim() >= 1 and t.shape[-1] > 1:
        yield "last-dim stride 2", _every_other(t)
    if t.dim() >= 2:
        yield "column-major", t.mT.contiguous().mT
    if t.dim() >= 1 and t.shape[0] > 1:
        yield "stride 0", t.narrow(0, 0, 1).expand(t.shape)
    if t.dim() >= 1:
        for layout, variant in non_strided(t):
            yield f"layout {layout}", variant
        yield "meta", t.to("meta")
        yield "fake", FakeTensorMode().from_tensor(t)
    if t.dtype.is_floating_point and t.dtype != FP8:
        yield "NaN", _filled(t, float("nan"))
        yield "inf", _filled(t, float("inf"))
    elif not t.dtype.is_floating_point and t.dtype != torch.bool:
        yield "all -1", _filled(t, -1)
        yield "huge", _filled(t, 2**30)
        yield "negative huge", _filled(t, -2**30)


def arg_mutations(kind: str, value):
    if kind == "Tensor":
        yield from tensor_mutations(value)
    elif kind == "Optional[Tensor]":
        if value is None:
            for t in (torch.ones(()), torch.ones(1), torch.ones(16), torch.ones(1, 1),
                      torch.ones(1, dtype=torch.bfloat16), torch.ones(1, dtype=I32)):
                yield f"tensor {tuple(t.shape)} {t.dtype}", t
        else:
            yield "None", None
            yield from tensor_mutations(value)
    elif kind == "int":
        for v in (0, -1, 1, 2, value + 1, 2**40, -2**40):
            if v != value:
                yield f"{v}", v
    elif kind == "float":
        for v in (float("nan"), float("inf"), -1.0, 0.0):
            yield f"{v}", v
    elif kind == "bool":
        yield f"{not value}", not value
    elif kind == "str":
        yield "'bogus'", "bogus"
        yield "''", ""
    elif kind == "ScalarType":
        for v in (torch.int32, FP8, torch.float64, torch.bool):
            if v != value:
                yield f"{v}", v
    else:
        raise AssertionError(f"no mutations for argument type {kind}")


def cases(name: str, sample: tuple):
    schema = getattr(torch.ops.moe_kernels, name).default._schema
    yield "valid", sample
    for i, arg in enumerate(schema.arguments):
        for label, value in arg_mutations(str(arg.real_type), sample[i]):
            args = list(sample)
            args[i] = value
            yield f"{arg.name} {label}", tuple(args)


# --- the contract ------------------------------------------------------------------------

def _devices(args) -> set:
    return {a.device for a in args if isinstance(a, torch.Tensor)}


def run_case(name: str, backend: str, args: tuple) -> str | None:
    """None when the case keeps the contract, else why not. Backend "triton": the
    registered Triton variant, held to its op's C++ check (where the op has one) and to
    one device per call; after them it may still refuse what only the Triton kernel
    cannot take, with a ValueError or TypeError of its own (naming the op), never anything
    else."""
    op = _library.OPS[name]
    triton = backend == "triton"
    check = op._arg_check if triton else getattr(_library._C, f"{name}_{backend}_check")
    if any(_unreadable(a) for a in args):
        return _refuses_unreadable(name, backend, args, check)
    kind, message = 0, ""
    if triton and len(_devices(args)) > 1:
        kind, message = 1, "every tensor argument must be on one device"
    elif check is not None:
        try:
            kind, message = check(*args)
        except Exception as exc:  # noqa: BLE001  (the check must never throw)
            return f"the check threw {exc!r}"
    raised, entered = _call_registered(name, backend, args)
    if triton and kind and message.startswith("every tensor"):
        ok = type(raised) is ValueError and "one device" in str(raised) and not entered
        return None if ok else f"mixed devices: the op raised {raised!r}"
    if triton and not kind:
        if raised is None:
            return None if entered else "the checks passed but the launcher never ran"
        if type(raised) in (ValueError, TypeError) and str(raised).startswith(name):
            return None   # what only the Triton kernel cannot take (Op's triton_check)
        return f"the Triton variant raised {raised!r}"
    if kind:
        expected = TypeError if kind == 2 else ValueError
        if type(raised) is not expected or str(raised) != f"{name}: {message}":
            return f"the check reported {expected.__name__} {message!r}; the op raised {raised!r}"
        if entered:
            return "the entry point ran after its check reported a problem"
        return None
    if raised is not None:
        return f"the check passed, then the kernel threw {raised!r}"
    if not entered:
        return "the check passed but the entry point never ran"
    return None


def _call_registered(name: str, backend: str, args: tuple):
    """(what the registered op raised or None, whether its kernel was entered)."""
    op = _library.OPS[name]
    triton = backend == "triton"
    entered = []
    table, key = (op._eager, "triton") if triton else (op.entries, backend)
    real = op._bare("triton") if triton else table[key]

    def spy(*a):
        entered.append(True)
        return real(*a)

    table[key] = spy
    try:
        getattr(torch.ops.moe_kernels, name + op._triton_suffix if triton else name)(*args)
        raised = None
    except Exception as exc:  # noqa: BLE001
        raised = exc
    finally:
        table[key] = real
    return raised, bool(entered)


def _unreadable(a) -> bool:
    """A tensor whose memory no kernel may read: sparse, mkldnn, meta, a FakeTensor."""
    return isinstance(a, torch.Tensor) and (
        a.layout != torch.strided or a.is_meta or torch._subclasses.fake_tensor.is_fake(a))


def _refuses_unreadable(name: str, backend: str, args: tuple, check) -> str | None:
    """A sparse, mkldnn, meta or fake tensor: the check reports a TypeError (the guard of
    every `_C.<entry>_check`, csrc/registration.cpp) without throwing, and the registered
    op never enters a kernel: the dispatcher has none of ours for the sparse and mkldnn
    keys (NotImplementedError), and sends meta and fake tensors to the op's fake (or
    refuses a mix of fake and real ones)."""
    if check is not None:
        try:
            kind, message = check(*args)
        except Exception as exc:  # noqa: BLE001  (the check must never throw)
            return f"the check threw {exc!r}"
        if kind != 2:
            return f"the check took an unreadable tensor: ({kind}, {message!r})"
    raised, entered = _call_registered(name, backend, args)
    if entered:
        return f"the kernel ran on an unreadable tensor (the op raised {raised!r})"
    return None


def _on(device: str, value):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    return value


def backends() -> list[tuple[str, str]]:
    """(backend, device) pairs to run: the C++ backends, and Triton under the interpreter;
    or those MOE_KERNELS_DIRECT_CALLS names ("triton:cuda": each mutated case compiles its
    own specialization, minutes of compiling, so the GPU's Triton run is a slow test)."""
    named = os.environ.get("MOE_KERNELS_DIRECT_CALLS")
    if named:
        return [tuple(pair.split(":")) for pair in named.split(",")]
    out = [("cpu", "cpu")]
    if torch.cuda.is_available() and _library.extension_has_cuda():
        out.append(("cuda", "cuda"))
    if _library.backend_unavailable_reason("triton", torch.device("cpu")) is None:
        out.append(("triton", "cpu"))
    return out


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    for backend, device in backends():
        for name, sample_list in samples().items():
            op = _library.OPS[name]
            runs = op.triton_module is not None if backend == "triton" else backend in op.native
            if (names and name not in names) or not runs:
                continue
            for s, sample in enumerate(sample_list):
                sample = tuple(_on(device, v) for v in sample)
                for label, args in cases(name, sample):
                    where = f"{backend}:{device} {name} [{s}] {label}"
                    print(f"case {where}", flush=True)
                    why = run_case(name, backend, args)
                    print(f"FAIL {where}: {why}" if why else "ok", flush=True)
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
