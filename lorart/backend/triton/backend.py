"""``TritonBackend``: which Triton path runs a call, and the registry-facing checks.

Paths (chosen by ``configs.forward_path``; reasons written there):

    fused         one launch: base (dense / 4-bit / 8-bit) + bias + one adapter for every row
    fused_gather  one launch: base + bias + per-row adapters (BGMV, decode-sized batches)
    split         base (torch.matmul for dense, the fused kernel without LoRA for packed W),
                  then SGMV shrink (x·Aᵀ) and expand (·Bᵀ added into y) over the segments
    library       base only, dense, many rows: torch.nn.functional.linear (cuBLAS)

Backward always runs ``backward.lora_linear_backward`` (dX kernel + SGMV gradients).
Triton and the kernels are imported on first use, never when lorart is imported.

Both are ``torch.library`` ops, ``lorart::triton_lora_forward`` / ``triton_lora_backward``,
with fake implementations, so ``torch.compile`` traces them (the Triton launches stay
opaque to it). Eager calls skip the dispatcher, as the cpu backend's do.
"""

from __future__ import annotations

import importlib.util

import torch

from ...adapters import AdapterBatch
from ..base import Backend, Base, LoRAArgs, WeightArgs, ids_of, weight_args

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class TritonBackend(Backend):
    name = "triton"

    def __init__(self) -> None:
        self._status: tuple[bool, str] | None = None

    def status(self) -> tuple[bool, str]:
        # Asked at every dispatch: the import check runs once per backend instance.
        if self._status is None:
            self._status = self._check_triton()
        return self._status

    @staticmethod
    def _check_triton() -> tuple[bool, str]:
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not importable (pip install triton)"
        try:
            import triton
        except Exception as exc:  # a broken install: say what broke
            return False, f"triton failed to import: {type(exc).__name__}: {exc}"
        return True, (f"triton {triton.__version__} (CUDA tensors; CPU tensors with "
                      f"TRITON_INTERPRET=1)")

    def unsupported(self, x: torch.Tensor, base: Base, lora: LoRAArgs | None) -> str | None:
        from .launch import interpreting, kernels_interpreted

        if x.device.type == "cpu":
            if not interpreting():
                return "CPU tensors run the Triton kernels only with TRITON_INTERPRET=1"
            if not kernels_interpreted():
                return ("the Triton kernels were built for the GPU before TRITON_INTERPRET=1 "
                        "was set; set it before the first Triton call to run CPU tensors")
        elif x.device.type != "cuda":
            return f"the triton backend runs CUDA tensors, got {x.device.type}"
        if x.dtype not in _DTYPES:
            return f"no Triton kernel for dtype={x.dtype} (float32, bfloat16, float16 only)"
        return None

    def forward(self, x, base, bias, lora, batch=None):
        if torch.compiler.is_compiling():
            return torch.ops.lorart.triton_lora_forward(x, *_flat(base, bias, lora, batch))
        return _forward(x, base, bias, lora, batch)

    def backward(self, dy, x, base, lora, batch, need_dx, need_dlora):
        from .backward import lora_linear_backward

        if not torch.compiler.is_compiling():
            return lora_linear_backward(dy, x, base, lora, batch, need_dx, need_dlora)
        dx, da, db = torch.ops.lorart.triton_lora_backward(
            dy, x, *_flat(base, None, lora, batch), need_dx, need_dlora)
        with_lora = need_dlora and lora is not None
        return (dx if need_dx else None, da if with_lora else None, db if with_lora else None)


def _forward(x, base, bias, lora, batch):
    from . import configs, fused_linear, sgmv
    from .launch import batch_segments

    m = x.shape[0]
    adapter_ids = ids_of(batch)
    quantized = not isinstance(base, torch.Tensor)
    path = configs.forward_path(m, quantized, adapter_ids is not None, lora is not None)
    if path == "fused" and lora is not None and lora.max_rank > configs.rank_block(
            lora.max_rank):
        path = "split"  # rank above the fused kernel's single rank block (128)
    if path == "library":
        return torch.nn.functional.linear(x, base, bias)
    if path in ("fused", "fused_gather"):
        return fused_linear.fused_forward(x, base, bias, lora, adapter_ids,
                                          gather=path == "fused_gather")
    # split: base first, then LoRA through the batch's adapter segments.
    if quantized:
        y = fused_linear.fused_forward(x, base, bias, None, None, gather=False)
    else:
        y = torch.nn.functional.linear(x, base, bias)
    if m == 0:
        return y
    offs, scales = lora.device_meta()
    order, seg_starts = batch_segments(batch, lora.num_adapters, m, x.device)
    k = x.shape[1]
    xa = sgmv.shrink(x, lora.a, k, 1, order, seg_starts, offs, lora.num_adapters,
                     lora.max_rank, x.dtype)
    return sgmv.expand(y, xa, lora.b, lora.a.shape[0], 1, order, seg_starts, offs, scales,
                       lora.num_adapters, x.dtype)


# --------------------------------------------------------------------------- custom ops
# The ops take the call's arguments as tensors and ints (what torch.library can carry):
# weight = dense W [N, K] (scheme -1) or packed codes (uint8 [N, K/2]; int8 [N, K], scheme 3)
# with scales/offsets
# [N, K/g]; a [R, K], b [N, R], rank_offsets int64 [S+1], lora_scales fp32 [S] and
# max_rank (None a: base only); adapter_ids [M] int32 with the batch's order [M] and
# seg_starts [S+2] (None ids: every row uses adapter 0).
def _flat(base, bias, lora, batch) -> tuple:
    w = weight_args(base)
    adapters = (None, None, None, None, 0) if lora is None else (
        lora.a, lora.b, *lora.device_meta(), lora.max_rank)
    ids = ids_of(batch)
    segments = (None, None) if ids is None else (
        batch.segments()[:2] if isinstance(batch, AdapterBatch)
        else AdapterBatch(ids, lora.num_adapters, checked=True).segments()[:2])
    return (w.data, w.scales, w.offsets, w.scheme, w.group_size, bias, *adapters, ids,
            *segments)


def _unflat(weight, scales, offsets, scheme, group_size, bias, a, b, rank_offsets,
            lora_scales, max_rank, adapter_ids, order, seg_starts):
    per_byte = 1 if weight.dtype == torch.int8 else 2  # 8-bit codes [N, K]; 4-bit [N, K/2]
    base = weight if scheme < 0 else WeightArgs(weight, scales, offsets, scheme, group_size,
                                                weight.shape[0], per_byte * weight.shape[1])
    lora = None if a is None else LoRAArgs.on_device(a, b, rank_offsets, lora_scales, max_rank)
    batch = None
    if adapter_ids is not None:
        batch = AdapterBatch(adapter_ids, lora_scales.numel(), checked=True)
        batch._segments = (order, seg_starts, None)
    return base, bias, lora, batch


@torch.library.custom_op("lorart::triton_lora_forward", mutates_args=())
def triton_lora_forward(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None,
    offsets: torch.Tensor | None, scheme: int, group_size: int, bias: torch.Tensor | None,
    a: torch.Tensor | None, b: torch.Tensor | None, rank_offsets: torch.Tensor | None,
    lora_scales: torch.Tensor | None, max_rank: int, adapter_ids: torch.Tensor | None,
    order: torch.Tensor | None, seg_starts: torch.Tensor | None,
) -> torch.Tensor:
    """``y [M, N]`` = ``x [M, K] Wᵀ + bias + LoRA`` (arguments: see above)."""
    base, bias, lora, batch = _unflat(weight, scales, offsets, scheme, group_size, bias, a, b,
                                      rank_offsets, lora_scales, max_rank, adapter_ids, order,
                                      seg_starts)
    return _forward(x, base, bias, lora, batch)


@triton_lora_forward.register_fake
def _(x, weight, *rest):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("lorart::triton_lora_backward", mutates_args=())
def triton_lora_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None,
    offsets: torch.Tensor | None, scheme: int, group_size: int, bias: torch.Tensor | None,
    a: torch.Tensor | None, b: torch.Tensor | None, rank_offsets: torch.Tensor | None,
    lora_scales: torch.Tensor | None, max_rank: int, adapter_ids: torch.Tensor | None,
    order: torch.Tensor | None, seg_starts: torch.Tensor | None, need_dx: bool,
    need_dlora: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx [M, K], da [R, K], db [N, R])``; one not needed comes back as an empty ``[0]``."""
    from .backward import lora_linear_backward

    base, _, lora, batch = _unflat(weight, scales, offsets, scheme, group_size, None, a, b,
                                   rank_offsets, lora_scales, max_rank, adapter_ids, order,
                                   seg_starts)
    grads = lora_linear_backward(dy, x, base, lora, batch, need_dx, need_dlora)
    return tuple(x.new_empty(0) if g is None else g for g in grads)


@triton_lora_backward.register_fake
def _(dy, x, weight, scales, offsets, scheme, group_size, bias, a, b, *rest):
    need_dx, need_dlora = rest[-2:]
    with_lora = need_dlora and a is not None
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0),
            a.new_empty(a.shape) if with_lora else x.new_empty(0),
            b.new_empty(b.shape) if with_lora else x.new_empty(0))
