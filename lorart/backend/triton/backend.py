"""``TritonBackend``: which Triton path runs a call, and the registry-facing checks.

Paths (chosen by ``configs.forward_path``; reasons written there):

    fused         one launch: base (dense / 4-bit) + bias + one adapter for every row
    fused_gather  one launch: base + bias + per-row adapters (BGMV, decode-sized batches)
    split         base (torch.matmul for dense, the fused kernel without LoRA for 4-bit),
                  then SGMV shrink (x·Aᵀ) and expand (·Bᵀ added into y) over the segments
    library       base only, dense, many rows: torch.nn.functional.linear (cuBLAS)

Backward always runs ``backward.lora_linear_backward`` (dX kernel + SGMV gradients).
Triton and the kernels are imported on first use, never when lorart is imported.
"""

from __future__ import annotations

import importlib.util

import torch

from ..base import Backend, Base, LoRAArgs

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
        if getattr(base, "bits", 4) != 4:  # formats (#14): 8-bit has no Triton kernel yet
            return f"no Triton kernel for the {base.bits}-bit scheme {base.scheme!r}"
        return None

    def forward(self, x, base, bias, lora, adapter_ids, segments=None):
        from . import configs, fused_linear, sgmv
        from .launch import adapter_meta, batch_segments

        m = x.shape[0]
        quantized = not isinstance(base, torch.Tensor)
        multi = adapter_ids is not None
        path = configs.forward_path(m, quantized, multi, lora is not None)
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
        offs, scales = adapter_meta(lora.rank_offsets, lora.scales, x.device)
        order, seg_starts = batch_segments(adapter_ids, lora.num_adapters, m, x.device,
                                           segments)
        k = x.shape[1]
        xa = sgmv.shrink(x, lora.a, k, 1, order, seg_starts, offs, lora.num_adapters,
                         lora.max_rank, x.dtype)
        return sgmv.expand(y, xa, lora.b, lora.a.shape[0], 1, order, seg_starts, offs, scales,
                           lora.num_adapters, x.dtype)

    def backward(self, dy, x, base, lora, adapter_ids, need_dx, need_dlora, segments=None):
        from .backward import lora_linear_backward

        return lora_linear_backward(dy, x, base, lora, adapter_ids, need_dx, need_dlora,
                                    segments)
