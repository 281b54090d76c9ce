"""What every Triton launcher shares: operand dtypes, weight arguments, adapter metadata.

Kernels take plain pointers and sizes. This module turns lorart's Python objects
(``QuantizedWeight``, ``LoRAArgs``, per-batch segments) into those arguments, and
chooses the ``tl.dot`` operand dtype per call:

- on a GPU, the input dtype itself (bf16 / fp16 tensor cores; fp32 with
  ``input_precision="ieee"`` so fp32 results are exact, not TF32);
- under ``TRITON_INTERPRET=1``, bf16 operands are upcast to fp32, because the
  interpreter multiplies bf16 bit patterns as integers (triton-lang/triton#11584).
"""

from __future__ import annotations

import os
import sys
from collections import OrderedDict

import torch
import triton.language as tl

from ...quant import QuantizedWeight, code_table

# Scheme ids as the kernels see them (tl.constexpr).
SCHEME_IDS = {"asym": 0, "sym": 1, "nf4": 2}

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def interpreting() -> bool:
    """Whether kernels run in Triton's CPU interpreter (read at call time, never at import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernels_interpreted() -> bool:
    """False if the kernels were already built for a GPU (TRITON_INTERPRET unset when they
    were first imported); triton fixes that choice when it decorates a kernel."""
    module = sys.modules.get("lorart.backend.triton.fused_linear")
    if module is None:
        return True
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(module.fused_lora_linear_kernel, InterpretedFunction)


def dot_dtype(dtype: torch.dtype):
    """The ``tl.dot`` operand dtype for inputs of ``dtype`` (see the module doc)."""
    if dtype == torch.bfloat16 and interpreting():
        return tl.float32
    return _TL_DTYPES[dtype]


def dot_precision(dtype: torch.dtype) -> str:
    """``"ieee"`` for fp32 operands (exact fp32 on a GPU); the default TF32 flag otherwise,
    where it does not apply (bf16/fp16 operands)."""
    return "ieee" if dot_dtype(dtype) == tl.float32 else "tf32"


class WeightArgs:
    """Base weight as kernel arguments: dense ``w [N, K]`` or the packed 4-bit tensors."""

    def __init__(self, base: torch.Tensor | QuantizedWeight, like: torch.Tensor):
        self.quantized = isinstance(base, QuantizedWeight)
        self.n, self.k = base.shape
        # Kernels index with row-major strides; .contiguous() is free when already so
        # (QuantizedWeight does not require it, e.g. after a converter's transpose).
        if self.quantized:
            self.w = like  # unused placeholder pointer
            self.qweight, self.scales = base.qweight.contiguous(), base.scales.contiguous()
            self.offsets = (base.offsets if base.offsets is not None else base.scales).contiguous()
            self.table = _code_table(base.scheme, base.device)
            self.group_size = base.group_size
            self.groups = self.k // base.group_size
            self.scheme = SCHEME_IDS[base.scheme]
        else:
            self.w = base.contiguous()
            self.qweight = self.scales = self.offsets = self.table = like
            self.group_size, self.groups, self.scheme = 0, 1, 0

    def args(self) -> tuple:
        """Pointers in kernel order: w, qweight, scales, offsets, table."""
        return (self.w, self.qweight, self.scales, self.offsets, self.table)


_TABLES: dict[tuple[str, str], torch.Tensor] = {}


def _code_table(scheme: str, device: torch.device) -> torch.Tensor:
    key = (scheme, str(device))
    if key not in _TABLES:
        _TABLES[key] = code_table(scheme, device).contiguous()
    return _TABLES[key]


# Per-layer adapter metadata (rank offsets as int32, scales as fp32) on the device, cached
# by value so a decode loop does not copy them host-to-device at every layer call.
_META: OrderedDict = OrderedDict()
_META_CAPACITY = 1024


def adapter_meta(rank_offsets: list[int], scales: list[float],
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rank_offsets int32 [S+1], scales fp32 [S])`` on ``device``."""
    key = (tuple(rank_offsets), tuple(scales), str(device))
    hit = _META.get(key)
    if hit is None:
        hit = (torch.tensor(rank_offsets, dtype=torch.int32, device=device),
               torch.tensor(scales, dtype=torch.float32, device=device))
        _META[key] = hit
        if len(_META) > _META_CAPACITY:
            _META.popitem(last=False)
    else:
        _META.move_to_end(key)
    return hit


def batch_segments(adapter_ids: torch.Tensor | None, num_adapters: int, m: int,
                   device: torch.device, segments=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order [M] int64, seg_starts [S+2] int64)`` as ``AdapterBatch.segments()`` defines.

    ``segments`` (the op surface's cached callable) is used when given, so the metadata
    is computed once per batch for every layer. Without ids every row uses adapter 0.
    """
    if segments is not None:
        order, seg_starts, _ = segments()
        return order, seg_starts
    if adapter_ids is None:  # device-side fills only: no host-to-device copy (graph-safe)
        order = torch.arange(m, dtype=torch.int64, device=device)
        seg_starts = torch.full((num_adapters + 2,), m, dtype=torch.int64, device=device)
        seg_starts[:2] = 0
        return order, seg_starts
    from ...adapters import AdapterBatch

    order, seg_starts, _ = AdapterBatch(adapter_ids, num_adapters).segments()
    return order, seg_starts
