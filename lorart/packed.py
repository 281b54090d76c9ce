"""Modules that hold a packed quantized weight in buffers ``qweight``/``scales``/``offsets``.

``model.to(torch.bfloat16)`` casts every floating buffer. For a packed weight that is
wrong: its scales and offsets are part of the layout (fp16 or fp32 only, chosen at
quantization; a bf16 copy of fp16 scales would round them and the kernels refuse it).
``KeepsPackedLayout._apply`` lets them follow device moves but never dtype casts.
"""

from __future__ import annotations

from torch import nn

PACKED_FLOAT_BUFFERS = ("scales", "offsets")


class KeepsPackedLayout(nn.Module):
    """Mixin: ``.to()``/``.cuda()``/``.half()`` move ``scales``/``offsets`` to the packed
    codes' device and leave their dtype alone; everything else converts as usual."""

    def _apply(self, fn, recurse: bool = True):
        packed = {n: self._buffers.pop(n) for n in PACKED_FLOAT_BUFFERS if n in self._buffers}
        try:
            super()._apply(fn, recurse)
        finally:
            codes = self._buffers.get("qweight")
            for name, t in packed.items():
                self._buffers[name] = t if t is None or codes is None else t.to(codes.device)
        return self
