"""The ``torch`` backend: the reference itself, on any device and dtype."""

from __future__ import annotations

import torch

from .. import reference
from .base import Backend, Base, LoRAArgs, ids_of


class TorchBackend(Backend):
    name = "torch"

    def status(self) -> tuple[bool, str]:
        return True, "pure-torch reference, always available"

    def unsupported(self, x: torch.Tensor, base: Base, lora: LoRAArgs | None) -> str | None:
        return None

    def forward(self, x, base, bias, lora, batch=None):
        adapter_ids = ids_of(batch)
        if lora is None:
            return reference.lora_forward(x, base, bias, None, None, [0], [], adapter_ids)
        return reference.lora_forward(x, base, bias, lora.a, lora.b, lora.rank_offsets,
                                      lora.scales, adapter_ids)

    def backward(self, dy, x, base, lora, batch, need_dx, need_dlora):
        adapter_ids = ids_of(batch)
        if lora is None:
            dx, _, _ = reference.lora_backward(dy, x, base, None, None, [0], [], adapter_ids)
            return dx, None, None
        dx, da, db = reference.lora_backward(dy, x, base, lora.a, lora.b, lora.rank_offsets,
                                             lora.scales, adapter_ids)
        return (dx if need_dx else None, da if need_dlora else None,
                db if need_dlora else None)
