"""Modules that hold a packed quantized weight in buffers ``qweight``/``scales``/``offsets``.

``model.to(torch.bfloat16)`` casts every floating buffer. For a packed weight that is
wrong: its scales and offsets are part of the layout (fp16 or fp32 only, chosen at
quantization; a bf16 copy of fp16 scales would round them and the kernels refuse it).
``KeepsPackedLayout._apply`` lets them follow device moves but never dtype casts.

``share_packed`` swaps the buffers for other tensors holding the same layout and values
(views of a concatenated q/k/v base, so a decoder's fused group is not a second copy).
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

    def share_packed(self, qweight, scales, offsets) -> None:
        """Hold ``qweight``/``scales``/``offsets`` in place of the packed buffers, typically
        views of a larger tensor that several layers share. The values must be the held
        ones (the caller's guarantee: the decoder passes views of a concatenation of these
        very buffers); dtype, shape and device are checked (``ValueError``)."""
        for name, new in (("qweight", qweight), ("scales", scales), ("offsets", offsets)):
            old = self._buffers.get(name)
            if (old is None) != (new is None) or (old is not None and (
                    old.dtype != new.dtype or old.shape != new.shape or old.device != new.device)):
                raise ValueError(f"share_packed: {name} must match the held layout "
                                 f"({_describe(old)}), got {_describe(new)}")
        self._buffers.update(qweight=qweight, scales=scales, offsets=offsets)
        self._packed_changed()

    def _packed_changed(self) -> None:
        """Called after the packed buffers were swapped (subclasses drop derived caches)."""


def _describe(t) -> str:
    return "None" if t is None else f"{t.dtype} {list(t.shape)} on {t.device}"
