"""The ``cuda`` backend: hand-written CUDA decode kernels (``csrc/cuda``) for 1-16 rows.

One layer is two launches (see ``csrc/cuda/decode.cu``):

    shrink   t[m, j] = c_s · x[m] · A_s[j]                 fp32 [M, max_rank], with adapters
    decode   y[m] = x[m] Wᵀ + bias + Σ_j t[m, j] B_s[:, j]   W 4-bit (asym/sym/nf4), 8-bit
                                                            (int8, offsets optional) or dense

``s = adapter_ids[m]`` (``-1`` = base only; no ids = adapter 0). Both run on the
tensor cores with fp32 accumulation for fp16 and bf16 activations. They are wrapped as
the ``torch.library`` op ``lorart::cuda_lora_decode`` (with a fake implementation) so
``torch.compile`` can trace them. ``backward`` delegates to the torch reference for now.

Status: compiled by nvcc in CI, **never run on a GPU**; the registry therefore never
picks this backend automatically (``LORART_BACKEND=cuda`` opts in) until
``benchmarks/gpu_check.py`` has checked and timed it on a GPU.
"""

import importlib

import torch

from ..quant import GROUP_SIZES, GROUP_SIZES_8BIT, QuantizedWeight
from .base import SCHEME_IDS, Backend, Base, LoRAArgs, ids_of, weight_args
from .torch_backend import TorchBackend

MAX_ROWS = 16  # the kernels' largest M (two m8 tensor-core tiles); csrc/cuda/decode.h
_DTYPES = (torch.float16, torch.bfloat16)
_ACT = {torch.float16: 0, torch.bfloat16: 1}
_UNVERIFIED = "unverified on a GPU"


def _module():
    """The compiled ``lorart._C_cuda``; raises ImportError when it was not built."""
    return importlib.import_module("lorart._C_cuda")


def _aligned(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` itself, or a fresh (allocator-aligned) copy when its data is not 16-byte aligned.

    The wide paths read 16 bytes at a time; a view with an odd storage offset would
    fault there, so it is copied (rare: tensors from the allocator are aligned).
    """
    if t is None or t.data_ptr() % 16 == 0:
        return t
    return t.clone()


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _check_op_args(x, weight, scales, offsets, bias, lora_a, lora_b, rank_offsets, lora_scales,
                   adapter_ids, group_size, scheme, max_rank) -> None:
    """Host-side checks of ``cuda_lora_decode``'s arguments (no device sync)."""
    if x.dim() != 2 or x.dtype not in _DTYPES:
        raise ValueError(f"x must be a float16/bfloat16 [M, K] tensor, got {x.dtype} "
                         f"{tuple(x.shape)}")
    m, k = x.shape
    if m > MAX_ROWS:
        raise ValueError(f"x has M={m} rows; the CUDA decode kernels take at most {MAX_ROWS}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    n = weight.shape[0]
    if weight.dtype == torch.int8:  # the 8-bit layout: codes [N, K], offsets optional
        if weight.shape[1] != k:
            raise ValueError(f"int8 codes (weight) must be [N, K] = [{n}, {k}], got "
                             f"{tuple(weight.shape)}")
        if scheme != SCHEME_IDS["int8"]:
            raise ValueError(f"scheme must be {SCHEME_IDS['int8']} (int8) for int8 codes, "
                             f"got {scheme}")
        _check_groups(n, k, group_size, GROUP_SIZES_8BIT, scales, offsets)
    elif weight.dtype == torch.uint8:
        if 2 * weight.shape[1] != k:
            raise ValueError(f"qweight must be [N, K/2] = [{n}, {k // 2}], got "
                             f"{tuple(weight.shape)}")
        if scheme not in (SCHEME_IDS["asym"], SCHEME_IDS["sym"], SCHEME_IDS["nf4"]):
            raise ValueError(f"scheme must be 0 (asym), 1 (sym) or 2 (nf4), got {scheme}")
        _check_groups(n, k, group_size, GROUP_SIZES, scales, offsets)
        if (offsets is None) != (scheme != SCHEME_IDS["asym"]):
            raise ValueError("offsets must be given exactly for scheme asym")
    elif weight.dtype != x.dtype or weight.shape[1] != k:
        raise ValueError(f"dense weight must be [N, K={k}] in x's dtype {x.dtype}, got "
                         f"{weight.dtype} {tuple(weight.shape)}")
    if bias is not None and (tuple(bias.shape) != (n,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be [N={n}] in x's dtype, got {bias.dtype} "
                         f"{tuple(bias.shape)}")
    if adapter_ids is not None and tuple(adapter_ids.shape) != (m,):
        raise ValueError(f"adapter_ids must be [M={m}], got {tuple(adapter_ids.shape)}")
    if lora_a is None:
        return
    if lora_b is None or rank_offsets is None or lora_scales is None:
        raise ValueError("lora_a needs lora_b, rank_offsets and lora_scales")
    r = lora_a.shape[0]
    if lora_a.dim() != 2 or lora_a.shape[1] != k or tuple(lora_b.shape) != (n, r):
        raise ValueError(f"lora_a must be [R, K={k}] and lora_b [N={n}, R], got "
                         f"{tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
    if lora_a.dtype != x.dtype or lora_b.dtype != x.dtype:
        raise ValueError("lora_a and lora_b must be in x's dtype")
    if rank_offsets.numel() != lora_scales.numel() + 1:
        raise ValueError(f"rank_offsets must have S+1 entries for S={lora_scales.numel()} "
                         f"scales, got {rank_offsets.numel()}")
    if not 0 <= max_rank <= r:
        raise ValueError(f"max_rank must lie in 0..R={r}, got {max_rank}")


def _check_groups(n, k, group_size, allowed, scales, offsets) -> None:
    """group_size, scales and offsets of a packed weight ``[N, K]`` (scales required)."""
    if group_size not in allowed or k % group_size:
        raise ValueError(f"group_size must be one of {allowed} and divide K={k}, got "
                         f"{group_size}")
    if scales is None:
        raise ValueError("scales are required for a quantized weight")
    for name, t in (("scales", scales), ("offsets", offsets)):
        if t is not None and tuple(t.shape) != (n, k // group_size):
            raise ValueError(f"{name} must be [N, K/group] = [{n}, {k // group_size}], "
                             f"got {tuple(t.shape)}")
        if t is not None and t.dtype not in (torch.float16, torch.float32):
            raise ValueError(f"{name} must be float16 or float32, got {t.dtype}")


# --------------------------------------------------------------------------- the op
@torch.library.custom_op("lorart::cuda_lora_decode", mutates_args=(), device_types="cuda")
def cuda_lora_decode(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor | None,
    offsets: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    rank_offsets: torch.Tensor | None,
    lora_scales: torch.Tensor | None,
    adapter_ids: torch.Tensor | None,
    group_size: int,
    scheme: int,
    max_rank: int,
) -> torch.Tensor:
    """``y [M, N]`` in x's dtype for ``M <= 16`` rows (see the module doc).

    Args:
        x: ``[M, K]`` float16 | bfloat16, contiguous.
        weight: packed ``qweight`` uint8 ``[N, K/2]`` (then ``scales`` ``[N, K/g]``
            float16|float32, ``offsets`` likewise for asym), 8-bit codes int8 ``[N, K]``
            (scheme 3; ``offsets`` optional, g from 16) or dense ``[N, K]`` in x's dtype.
        bias: ``[N]`` or None.
        lora_a, lora_b: ``[R, K]`` and ``[N, R]`` in x's dtype, or None (base only).
        rank_offsets: int64 ``[S+1]`` and lora_scales float32 ``[S]`` on x's device.
        adapter_ids: int32 ``[M]`` in ``-1..S-1``, or None (every row uses adapter 0).
        group_size, scheme: of the packed weight (scheme 0 asym, 1 sym, 2 nf4, 3 int8).
        max_rank: the largest adapter rank (row stride of the fp32 shrink output).

    Shapes and dtypes are checked here; the *values* of ``adapter_ids`` and
    ``rank_offsets`` are not (that would need a device sync): callers pass ids
    validated by ``AdapterBatch`` and offsets from an ``AdapterStack``, as the op
    surface does.
    """
    _check_op_args(x, weight, scales, offsets, bias, lora_a, lora_b, rank_offsets,
                   lora_scales, adapter_ids, group_size, scheme, max_rank)
    mod = _module()
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    quantized = weight.dtype in (torch.uint8, torch.int8)
    # The kernels index row-major contiguous buffers; these are no-ops for the op
    # surface's already contiguous tensors and make direct calls of the op safe.
    x, weight = _aligned(x.contiguous()), weight.contiguous()
    if quantized:
        weight = _aligned(weight)
    scales, offsets, bias, lora_a, lora_b = (
        None if v is None else v.contiguous() for v in (scales, offsets, bias, lora_a, lora_b))
    if rank_offsets is not None:
        rank_offsets = rank_offsets.to(torch.int64).contiguous()
    if lora_scales is not None:
        lora_scales = lora_scales.to(torch.float32).contiguous()
    if adapter_ids is not None:
        adapter_ids = adapter_ids.to(torch.int32).contiguous()
    act = _ACT[x.dtype]
    with torch.cuda.device(x.device):  # the launcher sizes the grid for the current device
        stream = torch.cuda.current_stream(x.device).cuda_stream
        t = None
        if lora_a is not None and max_rank > 0:
            t = torch.empty(m, max_rank, dtype=torch.float32, device=x.device)
            mod.lora_shrink(t=t.data_ptr(), x=x.data_ptr(), lora_a=lora_a.data_ptr(),
                            rank_offsets=_ptr(rank_offsets), lora_scales=_ptr(lora_scales),
                            adapter_ids=_ptr(adapter_ids), m=m, k=k, ldt=max_rank, act=act,
                            stream=stream)
        mod.lora_decode(
            y=y.data_ptr(), x=x.data_ptr(), weight=weight.data_ptr(), scales=_ptr(scales),
            offsets=_ptr(offsets), bias=_ptr(bias), lora_b=_ptr(lora_b if t is not None else None),
            lora_t=_ptr(t), rank_offsets=_ptr(rank_offsets), adapter_ids=_ptr(adapter_ids),
            m=m, n=n, k=k, ldb=0 if lora_b is None else lora_b.shape[1],
            ldt=max_rank, group_size=group_size, scheme=scheme, quantized=quantized,
            scales_f32=scales is not None and scales.dtype == torch.float32, act=act,
            stream=stream)
    return y


@cuda_lora_decode.register_fake
def _cuda_lora_decode_fake(x, weight, scales, offsets, bias, lora_a, lora_b, rank_offsets,
                           lora_scales, adapter_ids, group_size, scheme, max_rank):
    _check_op_args(x, weight, scales, offsets, bias, lora_a, lora_b, rank_offsets, lora_scales,
                   adapter_ids, group_size, scheme, max_rank)
    return x.new_empty(x.shape[0], weight.shape[0])


# --------------------------------------------------------------------------- backend
class CudaBackend(Backend):
    name = "cuda"

    def status(self) -> tuple[bool, str]:
        try:
            mod = _module()
        except ImportError as exc:
            return False, (f"lorart._C_cuda is not built (no CUDA toolkit when lorart was "
                           f"installed?): {exc}; {_UNVERIFIED}")
        built = f"built for {mod.ARCHS or '?'} with CUDA runtime {mod.runtime_version()}"
        if not torch.cuda.is_available():
            return False, f"no CUDA GPU visible (module {built}); {_UNVERIFIED}"
        driver = mod.driver_version()
        if driver < mod.runtime_version():
            return False, (f"the installed driver supports CUDA {driver}, older than the "
                           f"module's runtime (module {built}); {_UNVERIFIED}")
        major, minor = torch.cuda.get_device_capability()
        if major < 8:
            return False, f"needs compute capability 8.0+, GPU has {major}.{minor}; {_UNVERIFIED}"
        return True, (f"CUDA decode kernels for 1-{MAX_ROWS} rows ({built}); {_UNVERIFIED}, "
                      f"opt in with LORART_BACKEND=cuda")

    def unsupported(self, x: torch.Tensor, base: Base, lora: LoRAArgs | None) -> str | None:
        if x.device.type != "cuda":
            return f"the cuda backend runs CUDA tensors, got {x.device.type}"
        if x.dtype not in _DTYPES:
            return f"no CUDA kernel for dtype={x.dtype} (float16 and bfloat16 only)"
        if x.shape[0] > MAX_ROWS:
            return f"the CUDA decode kernels take at most {MAX_ROWS} rows, got M={x.shape[0]}"
        if isinstance(base, QuantizedWeight):
            if base.scheme not in SCHEME_IDS:
                return f"no CUDA kernel for scheme={base.scheme!r}"
        elif base.dtype != x.dtype:
            return f"dense base dtype {base.dtype} differs from x dtype {x.dtype}"
        if lora is not None and (lora.a.dtype != x.dtype or lora.b.dtype != x.dtype):
            return "adapters must be in x's dtype"
        return None

    def forward(self, x, base, bias, lora, batch=None):
        w = weight_args(base)
        a = b = offs = lora_scales = None
        max_rank = 0
        if lora is not None and lora.max_rank > 0:
            a, b, max_rank = lora.a, lora.b, lora.max_rank
            offs, lora_scales = lora.device_meta()
        bias = None if bias is None else bias.contiguous()
        ids = ids_of(batch)
        return torch.ops.lorart.cuda_lora_decode(x, w.data, w.scales, w.offsets, bias, a, b, offs,
                                                 lora_scales, ids, w.group_size,
                                                 max(w.scheme, 0), max_rank)

    def backward(self, dy, x, base, lora, batch, need_dx, need_dlora):
        # Decode is inference; training runs through the torch reference (or pick the
        # triton backend, which has backward kernels) until CUDA backward kernels exist.
        return TorchBackend().backward(dy, x, base, lora, batch, need_dx, need_dlora)
