"""What every backend implements, and the arguments the op surface hands it.

The op surface (``lorart.ops``) validates everything first; a backend receives only
checked, contiguous 2-D tensors on one device:

    x            [M, K]   float32 | bfloat16 | float16
    base         dense W [N, K] (x's dtype) or a QuantizedWeight [N, K]
    bias         [N] (x's dtype) or None
    lora         LoRAArgs or None (base only)
    adapter_ids  [M] int32 in -1..S-1, or None: every row uses adapter 0
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant import QuantizedWeight


@dataclass
class LoRAArgs:
    """Packed adapters of one layer (see ``lorart.adapters.AdapterStack``).

    a [R, K] and b [N, R] in x's dtype, contiguous; adapter s owns rank rows
    ``rank_offsets[s]:rank_offsets[s+1]``; ``scales[s]`` multiplies its output.
    """

    a: torch.Tensor
    b: torch.Tensor
    rank_offsets: list[int]
    scales: list[float]

    @property
    def num_adapters(self) -> int:
        return len(self.scales)

    @property
    def max_rank(self) -> int:
        offs = self.rank_offsets
        return max((hi - lo for lo, hi in zip(offs, offs[1:])), default=0)


Base = torch.Tensor | QuantizedWeight


class Backend:
    """A set of kernels for the fused LoRA linear op. Subclasses override the methods."""

    name: str = "?"

    def status(self) -> tuple[bool, str]:
        """``(available, reason)``: the reason says why not, or what is in use."""
        raise NotImplementedError

    def unsupported(self, x: torch.Tensor, base: Base, lora: LoRAArgs | None) -> str | None:
        """``None`` if this backend runs these inputs, else why not (device, dtype...)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, base: Base, bias: torch.Tensor | None,
                lora: LoRAArgs | None, adapter_ids: torch.Tensor | None,
                segments=None) -> torch.Tensor:
        """``y [M, N]`` in x's dtype (see the module doc for the arguments)."""
        raise NotImplementedError

    def backward(self, dy: torch.Tensor, x: torch.Tensor, base: Base, lora: LoRAArgs | None,
                 adapter_ids: torch.Tensor | None, need_dx: bool, need_dlora: bool,
                 segments=None,
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``(dx [M, K], da [R, K], db [N, R])`` for a frozen base; ``None`` where not needed."""
        raise NotImplementedError
