"""The ``cpu`` backend: fused base + LoRA + 4-bit kernels in C++ (``lorart._C``).

One op chain: ``CpuBackend.forward`` → ``torch.ops.lorart.cpu_lora_forward`` (a
``torch.library.custom_op`` with a fake implementation, so ``torch.compile`` traces it)
→ ``lorart._C.cpu_forward`` (keyword arguments: buffers as (pointer, element count) so
the C++ side checks each against the shapes, sizes, row strides; the GIL is released) →
the kernel table of the instruction set chosen at run time (AVX-512 with AVX512-BF16
for bfloat16 x, AVX-512, AVX2+FMA+F16C or portable scalar; ``LORART_CPU_ISA`` or
:func:`set_isa` forces one).

    y[i]  = x[i] Wᵀ + bias + c_s · (x[i] A_sᵀ) B_sᵀ            s = adapter_ids[i] (-1: none)
    dx    = dy W + Σ_s c_s (dy_s B_s) A_s
    dA_s  = c_s (dy_s B_s)ᵀ x_s          dB_s = c_s dy_sᵀ (x_s A_sᵀ)

Supported: CPU tensors, x/W/A/B float32 or bfloat16 (fp32 accumulation, output in x's
dtype), dense W or a ``QuantizedWeight`` (asym, sym, nf4; any group size; fp16 or fp32
scales; the 8-bit ``int8`` layout through the same op, scheme 3: ``cpu_int8.py``).
Anything else gets a reason from :meth:`CpuBackend.unsupported` and the registry falls
back to the torch reference.
"""

from __future__ import annotations

import torch

from .. import _C
from ..quant import QuantizedWeight
from . import cpu_int8
from .base import SCHEME_IDS, Backend, Base, LoRAArgs, ids_of, weight_args
from .base import buffer as _buf

__all__ = ["CpuBackend", "available_isas", "isa", "set_isa"]

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1}
_SCALE_DTYPE_CODE = {torch.float32: 0, torch.float16: 2}
_DENSE = -1
_INT8 = SCHEME_IDS["int8"]  # 8-bit codes [N, K]: cpu_int8.forward

# Rows up to which the forward runs the fused decode GEMV (each packed byte unpacked once
# for up to 4 rows at a time, LoRA added in the same pass); above it, the tiled GEMM
# (96x256 tiles of W dequantized into L2, 6x32 fp32 FMA register tile, LoRA epilogue).
# Measured (4096x4096 asym g128, rank 16, fp32, AVX-512, best of 8 on a shared 2-core
# machine, so +-20%; `pytest benchmarks/bench_cpu_lora.py -k crossover` repeats it):
#   rows                16       24       32       48
#   decode, 2 threads  1.6 ms   2.9 ms   3.9 ms   5.8 ms
#   gemm,   2 threads  2.7 ms   2.7 ms   2.8 ms   5.4 ms   (rows padded to 32)
#   decode, 1 thread   3.0 ms   5.7 ms   7.6 ms  11.3 ms
#   gemm,   1 thread   5.1 ms   5.3 ms   5.4 ms  10.2 ms
DECODE_MAX_ROWS = 20

# Kernel tables with AVX512-BF16 (vdpbf16ps) kernels for bfloat16 x (csrc/cpu/
# isa_avx512bf16.cpp). With one of them, bf16 never goes to torch's GEMM (the two
# LIBRARY constants below apply only without it); the rows of a bf16 call pick:
#   rows <= BF16_DECODE_MAX_ROWS (4-bit) / BF16_DENSE_DECODE_MAX_ROWS (dense):
#       the streaming decode GEMV above (fp32 FMA; 1-4 rows are bandwidth-bound, and it
#       reads each packed byte once for up to 4 rows);
#   up to 47 rows: bf16 row streaming (W rows decoded to bf16 in registers, 8 rows of x
#       per decode, vdpbf16ps; no panel to pack);
#   from 48 rows (kPanelMinRows in the C++): the panel GEMM (64 columns x 2048 k of W
#       packed per thread in L2, 6x64 vdpbf16ps register tile, LoRA in the epilogue).
# The crossovers come from the kernels' work per weight (panel packing costs about
# what 8-16 streamed rows do) and were checked with `pytest benchmarks/bench_cpu_lora.py
# -k crossover` on 2026-12-02 while 7 other engineers loaded this 2-core machine
# (load average 12-17): timings were too noisy to move the constants by; see RESULTS.md.
BF16_KERNEL_ISAS = ("avx512bf16",)
BF16_DECODE_MAX_ROWS = 4
# Dense bf16 W: 1 row reads the same bytes either way; from 2 rows the bf16 kernels
# stream W once for up to 8 rows (the fp32 decode ran 1.09 ms at 2 rows vs torch's 0.90).
BF16_DENSE_DECODE_MAX_ROWS = 1

# bfloat16 with at least this many rows and a 4-bit base: W is dequantized to bf16 (C++,
# SIMD) and multiplied by torch's bf16 GEMM (oneDNN, AVX512-BF16), then the C++ LoRA
# epilogue is added. torch's bf16 GEMM ran ~920 GFLOP/s here against ~330 for the fp32
# FMA tile of the fused GEMM (4096x4096, 512 rows: 18.6 ms vs 52 ms), which no fusion
# saving can make up; fp32 keeps the fused GEMM (torch fp32 matmul: 81 ms there).
LIBRARY_GEMM_MIN_ROWS = 64
# A dense bf16 W with at least this many rows goes to torch's bf16 GEMM (plus the C++
# LoRA epilogue): there is nothing to dequantize, and the fused fp32-FMA decode only won
# at 1 row (4096x4096, rank 16, warm cache, 2 threads, 2026-11-29):
#   rows      1      2      4      8      16     32
#   fused   0.64   1.09   1.60   2.43   4.36   3.99 ms
#   torch   1.00   0.90   0.93   1.08   1.36   2.04 ms  (linear + unfused LoRA)
DENSE_LIBRARY_GEMM_MIN_ROWS = 2
# Dequantized W rows per GEMM call. Smaller chunks would stay in L3, but oneDNN ran
# 1024-row chunks ~50% slower than one 4096-row call (4096x4096, 512 rows), and the
# chunked yᵀ form ~2x slower at 4096x11008, so layers up to 256 MiB of bf16 W (every
# Llama-2/3-8B layer) are dequantized whole into a transient buffer, larger ones in chunks.
_LIBRARY_CHUNK_BYTES = 256 << 20


# A Python mirror of the ISA in use, so status() reads no pybind function while
# torch.compile traces the op surface (a pybind call would break the graph).
_ISA = {"active": _C.isa(), "available": list(_C.available_isas()), "threads": _C.max_threads()}


def set_isa(name: str) -> None:
    """Force the kernels of one instruction set: ``"scalar"``, ``"avx2"``, ``"avx512"`` or
    ``"avx512bf16"``.

    ``ValueError`` if the CPU (or this build) lacks it. ``LORART_CPU_ISA`` sets the
    initial choice; by default the best one available is used.
    """
    _C.set_isa(name)
    _ISA["active"] = _C.isa()


def isa() -> str:
    """The instruction set the kernels use now."""
    return _ISA["active"]


def available_isas() -> list[str]:
    """Instruction sets this build and CPU support, best first."""
    return list(_ISA["available"])



def _rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D tensor whose columns are contiguous (rows may be strided)."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _row_stride(t: torch.Tensor) -> int:
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def _weight_args(weight: torch.Tensor, scales: torch.Tensor | None,
                 offsets: torch.Tensor | None, scheme: int, group_size: int) -> dict:
    """The weight's keyword arguments of the ``_C`` functions."""
    dense = scheme == _DENSE
    return dict(n=weight.shape[0], k=weight.shape[1] * (1 if dense else 2), scheme=scheme,
                weight=_buf(weight), scales=_buf(scales), offsets=_buf(offsets),
                scale_dtype=0 if dense else _SCALE_DTYPE_CODE[scales.dtype],
                group_size=0 if dense else group_size)


# --------------------------------------------------------------------------- custom ops
def _forward_impl(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor | None,
    offsets: torch.Tensor | None,
    scheme: int,
    group_size: int,
    bias: torch.Tensor | None,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    rank_offsets: list[int],
    lora_scales: list[float],
    adapter_ids: torch.Tensor | None,
    decode_max_rows: int,
) -> torch.Tensor:
    """The body of ``lorart::cpu_lora_forward`` (see there)."""
    if scheme == _INT8:
        return cpu_int8.forward(x, weight, scales, offsets, group_size, bias, a, b,
                                rank_offsets, lora_scales, adapter_ids, decode_max_rows)
    x = _rows(x)
    m = x.shape[0]
    n = weight.shape[0]
    if m == 0 or n == 0:
        return torch.empty((m, n), dtype=x.dtype)
    if _library_gemm(x.dtype, scheme, m) and scheme != _DENSE:
        return _forward_library(x, weight, scales, offsets, scheme, group_size, bias, a, b,
                                rank_offsets, lora_scales, adapter_ids)
    if _library_gemm(x.dtype, scheme, m):
        y = torch.nn.functional.linear(x, weight, bias).contiguous()
        return _add_lora(y, x, a, b, rank_offsets, lora_scales, adapter_ids)
    y = torch.empty((m, n), dtype=x.dtype)
    weight, bias = weight.contiguous(), None if bias is None else bias.contiguous()
    scales = None if scales is None else scales.contiguous()
    offsets = None if offsets is None else offsets.contiguous()
    a = None if a is None else a.contiguous()
    b = None if b is None else b.contiguous()
    ids = None if adapter_ids is None else adapter_ids.to(torch.int32).contiguous()
    _C.cpu_forward(m=m, dtype=_DTYPE_CODE[x.dtype], x=_buf(x), ldx=_row_stride(x),
                   **_weight_args(weight, scales, offsets, scheme, group_size),
                   bias=_buf(bias), a=_buf(a), b=_buf(b),
                   total_rank=0 if b is None else b.shape[1], rank_offsets=rank_offsets,
                   lora_scales=lora_scales, adapter_ids=_buf(ids), y=_buf(y), ldy=n,
                   decode_max_rows=decode_max_rows)
    return y


def _decode_max_rows(dtype: torch.dtype, scheme: int) -> int:
    """Rows up to which the forward runs the streaming decode GEMV (fp32 FMA)."""
    if scheme == _INT8:
        return cpu_int8.INT8_DECODE_MAX_ROWS
    if dtype == torch.bfloat16 and _ISA["active"] in BF16_KERNEL_ISAS:
        return BF16_DECODE_MAX_ROWS if scheme != _DENSE else BF16_DENSE_DECODE_MAX_ROWS
    return DECODE_MAX_ROWS


def _library_gemm(dtype: torch.dtype, scheme: int, m: int) -> bool:
    """Whether torch's bf16 GEMM (plus the C++ LoRA epilogue) beats the fused kernels:
    only without AVX512-BF16 kernels (see BF16_KERNEL_ISAS)."""
    if dtype != torch.bfloat16 or _ISA["active"] in BF16_KERNEL_ISAS:
        return False
    return m >= (DENSE_LIBRARY_GEMM_MIN_ROWS if scheme == _DENSE else LIBRARY_GEMM_MIN_ROWS)


def _forward_library(x, weight, scales, offsets, scheme, group_size, bias, a, b, rank_offsets,
                     lora_scales, adapter_ids) -> torch.Tensor:
    """Many bf16 rows: torch's GEMM on W dequantized in chunks of rows (``yᵀ[chunk] =
    W[chunk] xᵀ``; one chunk = ``linear(x, W, bias)``), then the LoRA terms in C++."""
    m, k = x.shape
    n = weight.shape[0]
    weight, scales = weight.contiguous(), scales.contiguous()
    offsets = None if offsets is None else offsets.contiguous()
    args = _weight_args(weight, scales, offsets, scheme, group_size)
    chunk = max(1, min(n, _LIBRARY_CHUNK_BYTES // (2 * k)))
    w_chunk = torch.empty((chunk, k), dtype=x.dtype)
    if chunk == n:
        _C.cpu_dequantize(**args, n0=0, n1=n, out=_buf(w_chunk), dtype=_DTYPE_CODE[x.dtype])
        y = torch.nn.functional.linear(x, w_chunk, bias)
    else:
        yt = torch.empty((n, m), dtype=x.dtype)
        xt = x.contiguous().T
        for n0 in range(0, n, chunk):
            n1 = min(n, n0 + chunk)
            _C.cpu_dequantize(**args, n0=n0, n1=n1, out=_buf(w_chunk),
                              dtype=_DTYPE_CODE[x.dtype])
            if bias is None:
                torch.mm(w_chunk[: n1 - n0], xt, out=yt[n0:n1])
            else:
                torch.addmm(bias[n0:n1, None], w_chunk[: n1 - n0], xt, out=yt[n0:n1])
        y = yt.T.contiguous()
    return _add_lora(y, x, a, b, rank_offsets, lora_scales, adapter_ids)


def _add_lora(y, x, a, b, rank_offsets, lora_scales, adapter_ids) -> torch.Tensor:
    """``y [M, N]`` (holding the base output, contiguous) += the LoRA terms, in C++."""
    if a is None:
        return y
    m, k = x.shape
    n = y.shape[1]
    a, b = a.contiguous(), b.contiguous()
    ids = None if adapter_ids is None else adapter_ids.to(torch.int32).contiguous()
    _C.cpu_lora_add(m=m, dtype=_DTYPE_CODE[x.dtype], x=_buf(x), ldx=_row_stride(x), n=n, k=k,
                    a=_buf(a), b=_buf(b), total_rank=b.shape[1], rank_offsets=rank_offsets,
                    lora_scales=lora_scales, adapter_ids=_buf(ids), y=_buf(y), ldy=n)
    return y


@torch.library.custom_op("lorart::cpu_lora_forward", mutates_args=(), device_types="cpu")
def cpu_lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor | None,
    offsets: torch.Tensor | None,
    scheme: int,
    group_size: int,
    bias: torch.Tensor | None,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    rank_offsets: list[int],
    lora_scales: list[float],
    adapter_ids: torch.Tensor | None,
    decode_max_rows: int,
) -> torch.Tensor:
    """``y [M, N]`` (x's dtype) = ``x [M, K] Wᵀ + bias + LoRA``.

    ``weight`` is the dense ``W [N, K]`` (``scheme=-1``), the packed codes
    ``[N, K/2]`` uint8 with ``scales``/``offsets [N, K/g]`` (scheme 0/1/2 =
    asym/sym/nf4) or 8-bit codes ``[N, K]`` int8 (scheme 3, offsets optional).
    ``a [R, K]``, ``b [N, R]``; ``adapter_ids [M]`` int32 or None.
    """
    return _forward_impl(x, weight, scales, offsets, scheme, group_size, bias, a, b,
                         rank_offsets, lora_scales, adapter_ids, decode_max_rows)


@cpu_lora_forward.register_fake
def _(x, weight, scales, offsets, scheme, group_size, bias, a, b, rank_offsets, lora_scales,
      adapter_ids, decode_max_rows):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("lorart::cpu_lora_backward", mutates_args=(), device_types="cpu")
def cpu_lora_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor | None,
    offsets: torch.Tensor | None,
    scheme: int,
    group_size: int,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    rank_offsets: list[int],
    lora_scales: list[float],
    adapter_ids: torch.Tensor | None,
    need_dx: bool,
    need_dlora: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx [M, K], da [R, K], db [N, R])`` for a frozen base; a gradient that is not
    needed (or has no adapter) comes back as an empty ``[0]`` tensor."""
    dy, x = _rows(dy), _rows(x)
    m, k = x.shape
    weight = weight.contiguous()
    scales = None if scales is None else scales.contiguous()
    offsets = None if offsets is None else offsets.contiguous()
    with_lora = need_dlora and a is not None
    dx = torch.empty((m, k), dtype=x.dtype) if need_dx else x.new_empty(0)
    da = torch.zeros(a.shape, dtype=torch.float32) if with_lora else x.new_empty(0)
    db = torch.zeros(b.shape, dtype=torch.float32) if with_lora else x.new_empty(0)
    if m > 0 and (need_dx or with_lora):
        a = None if a is None else a.contiguous()
        b = None if b is None else b.contiguous()
        ids = None if adapter_ids is None else adapter_ids.to(torch.int32).contiguous()
        _C.cpu_backward(m=m, dtype=_DTYPE_CODE[x.dtype], dy=_buf(dy), lddy=_row_stride(dy),
                        x=_buf(x), ldx=_row_stride(x),
                        **_weight_args(weight, scales, offsets, scheme, group_size),
                        a=_buf(a), b=_buf(b), total_rank=0 if b is None else b.shape[1],
                        rank_offsets=rank_offsets, lora_scales=lora_scales,
                        adapter_ids=_buf(ids), dx=_buf(dx if need_dx else None), lddx=k,
                        da=_buf(da if with_lora else None), db=_buf(db if with_lora else None))
    if with_lora:
        da, db = da.to(a.dtype), db.to(b.dtype)
    return dx, da, db


@cpu_lora_backward.register_fake
def _(dy, x, weight, scales, offsets, scheme, group_size, a, b, rank_offsets, lora_scales,
      adapter_ids, need_dx, need_dlora):
    with_lora = need_dlora and a is not None
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    da = a.new_empty(a.shape) if with_lora else x.new_empty(0)
    db = b.new_empty(b.shape) if with_lora else x.new_empty(0)
    return dx, da, db


# --------------------------------------------------------------------------- backend
def _lora_parts(lora: LoRAArgs | None) -> tuple:
    if lora is None:
        return None, None, [0], []
    return lora.a, lora.b, lora.rank_offsets, lora.scales


class CpuBackend(Backend):
    """C++ kernels for CPU tensors (see the module doc)."""

    name = "cpu"

    def status(self) -> tuple[bool, str]:
        return True, (f"C++ kernels, {_ISA['active']} of {'/'.join(_ISA['available'])}, "
                      f"{_ISA['threads']} OpenMP threads")

    def unsupported(self, x: torch.Tensor, base: Base, lora: LoRAArgs | None) -> str | None:
        if x.device.type != "cpu":
            return f"x is on {x.device}; the cpu backend runs CPU tensors only"
        if x.dtype not in _DTYPE_CODE:
            return f"no C++ kernel for dtype={x.dtype} (float32 and bfloat16 only)"
        if isinstance(base, QuantizedWeight):
            if base.device.type != "cpu":
                return f"the quantized base is on {base.device}"
            if base.scales.dtype not in _SCALE_DTYPE_CODE:
                return f"no C++ kernel for scale dtype {base.scales.dtype}"
        elif base.dtype != x.dtype:
            return f"dense base dtype {base.dtype} differs from x dtype {x.dtype}"
        if lora is not None and (lora.a.dtype != x.dtype or lora.b.dtype != x.dtype):
            return f"adapters are {lora.a.dtype}, x is {x.dtype}"
        return None

    def forward(self, x, base, bias, lora, batch=None):
        w = weight_args(base)
        a, b, rank_offsets, lora_scales = _lora_parts(lora)
        # Eager calls skip the dispatcher (~10 us of a ~200 us decode step); traced calls
        # go through the registered op so torch.compile sees it.
        op = torch.ops.lorart.cpu_lora_forward if torch.compiler.is_compiling() else _forward_impl
        return op(x, w.data, w.scales, w.offsets, w.scheme, w.group_size, bias, a, b,
                  rank_offsets, lora_scales, ids_of(batch), _decode_max_rows(x.dtype, w.scheme))

    def backward(self, dy, x, base, lora, batch, need_dx, need_dlora):
        w = weight_args(base)
        if w.scheme == _INT8:  # dense backward on W dequantized in C++
            w = weight_args(cpu_int8.int8_dequantize(base, x.dtype))
        a, b, rank_offsets, lora_scales = _lora_parts(lora)
        dx, da, db = torch.ops.lorart.cpu_lora_backward(
            dy, x, w.data, w.scales, w.offsets, w.scheme, w.group_size, a, b, rank_offsets,
            lora_scales, ids_of(batch), need_dx, need_dlora and lora is not None)
        with_lora = need_dlora and lora is not None
        return (dx if need_dx else None, da if with_lora else None, db if with_lora else None)


# --------------------------------------------------------------------------- decode (#15)
def kernel_weight_args(base: torch.Tensor | QuantizedWeight, dtype: torch.dtype) -> dict | None:
    """The keyword arguments that describe ``base`` to the ``lorart._C`` kernels, for
    callers that bind a layer once and call the kernel many times (``lorart.runtime``).

    ``{"int8": False, n, k, scheme, weight, scales, offsets, scale_dtype, group_size}`` for a
    dense or 4-bit base (``cpu_forward``, ``DecodePlan.add_linear``); ``{"int8": True, n, k,
    codes, scales, offsets, scale_dtype, group_size}`` for the 8-bit layout
    (``DecodePlan.add_int8_linear``); ``None`` where no C++ kernel takes ``base`` with
    activations of ``dtype``. Buffers are ``(pointer, elements)``: the caller keeps the
    tensors alive and contiguous (``base`` is made contiguous by the caller, not here).
    """
    if dtype not in _DTYPE_CODE:
        return None
    if isinstance(base, QuantizedWeight):
        if base.device.type != "cpu" or base.scales.dtype not in _SCALE_DTYPE_CODE:
            return None
        tensors = [base.qweight, base.scales, base.offsets]
        if not all(t is None or t.is_contiguous() for t in tensors):
            return None
        if base.scheme == "int8":
            return dict(int8=True, n=base.qweight.shape[0], k=base.qweight.shape[1],
                        codes=_buf(base.qweight), scales=_buf(base.scales),
                        offsets=_buf(base.offsets),
                        scale_dtype=_SCALE_DTYPE_CODE[base.scales.dtype],
                        group_size=base.group_size)
        return dict(int8=False, **_weight_args(base.qweight, base.scales, base.offsets,
                                               SCHEME_IDS[base.scheme], base.group_size))
    if base.device.type != "cpu" or base.dtype != dtype or not base.is_contiguous():
        return None
    return dict(int8=False, **_weight_args(base, None, None, _DENSE, 0))


def dtype_code(dtype: torch.dtype) -> int:
    """The ``dtype`` argument of the ``lorart._C`` kernels for activations of ``dtype``."""
    return _DTYPE_CODE[dtype]
