"""A quantized embedding table, and an output layer that reads the same packed matrix.

``QuantizedEmbedding`` holds a ``QuantizedWeight`` ``[V, D]`` (vocab, hidden; 4- or 8-bit)
and dequantizes only the rows a batch looks up, with the layout's own arithmetic, so a
GGUF Q8_0 ``token_embd`` gives the same float32 values as ``gguf``'s dequantizer while
staying at ~1.06 bytes a value. ``TiedQuantizedLinear`` is a model's tied output layer
``logits [..., V] = h [..., D] Wᵀ`` over the *same* buffers, through lorart's fused kernel
(``lora_linear``), so the matrix is held once and read packed at every decode step.

``QuantizedLinear`` is an untied output layer with its own packed matrix. None of them
is a ``LoRALinear``: ``lorart.add_adapter`` does not add adapters to them (PEFT's
"all-linear" leaves the output layer alone too).
"""

from __future__ import annotations

import torch
from torch import nn

from .ops import lora_linear
from .packed import KeepsPackedLayout
from .quant import QuantizedWeight


class _PackedMatrix(KeepsPackedLayout):
    """What the modules below share: a ``QuantizedWeight`` held as the buffers ``qweight``,
    ``scales`` and ``offsets`` (as in ``LoRALinear``), rebuilt by :attr:`base` so it follows
    ``.to()``, and float casts that leave the packed layout alone (``KeepsPackedLayout``)."""

    def _hold(self, base: QuantizedWeight) -> None:
        if not isinstance(base, QuantizedWeight):
            raise TypeError(f"base must be a QuantizedWeight, got {type(base).__name__}")
        self.register_buffer("qweight", base.qweight)
        self.register_buffer("scales", base.scales)
        self.register_buffer("offsets", base.offsets)
        self.group_size, self.scheme = base.group_size, base.scheme

    @property
    def base(self) -> QuantizedWeight:
        """The packed matrix (rebuilt from the buffers, so it follows ``.to()``)."""
        return QuantizedWeight(self.qweight, self.scales, self.offsets, self.group_size,
                               self.scheme)


class QuantizedEmbedding(_PackedMatrix):
    """``nn.Embedding`` over a packed ``QuantizedWeight`` ``[num_embeddings, embedding_dim]``.

    Buffers ``qweight``/``scales``/``offsets`` as in ``LoRALinear``; ``forward(ids [...])``
    returns float32 ``[..., embedding_dim]`` (``dtype`` changes that).
    """

    def __init__(self, base: QuantizedWeight, padding_idx: int | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self._hold(base)
        self.num_embeddings, self.embedding_dim = base.shape
        self.padding_idx = padding_idx
        self.dtype = dtype

    def __getattr__(self, name: str):
        if name == "weight":  # say why, rather than nn.Module's bare "no attribute"
            raise AttributeError(
                "QuantizedEmbedding keeps its table packed and has no float .weight: use "
                ".base (the QuantizedWeight), .dtype (the output dtype) or .qweight.device")
        return super().__getattr__(name)

    def _apply(self, fn, recurse: bool = True):
        """As for every packed matrix; a float cast changes the output ``dtype`` instead."""
        super()._apply(fn, recurse)
        probe = fn(torch.zeros((), dtype=self.dtype))
        if probe.is_floating_point():
            self.dtype = probe.dtype
        return self

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` rows of the dequantized table for ``input_ids [...]`` (int)."""
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"input_ids must be int32/int64, got {input_ids.dtype}")
        flat = input_ids.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"input_ids must be in [0, {self.num_embeddings}), got values in "
                             f"[{int(flat.min())}, {int(flat.max())}]")
        rows = self.base.rows(flat).dequantize(self.dtype)
        return rows.reshape(*input_ids.shape, self.embedding_dim)

    def nbytes(self) -> int:
        return self.base.nbytes()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, base={self.base!r}"


class TiedQuantizedLinear(nn.Module):
    """A bias-free output layer ``y [..., V] = x [..., D] Wᵀ`` over a ``QuantizedEmbedding``'s
    buffers (the same tensors: tied, held once). Runs ``lora_linear`` (the fused kernels)."""

    def __init__(self, embedding: QuantizedEmbedding) -> None:
        super().__init__()
        self.in_features = embedding.embedding_dim
        self.out_features = embedding.num_embeddings
        self.__dict__["embedding"] = embedding  # not a submodule: state is the embedding's

    @property
    def base(self) -> QuantizedWeight:
        """The shared packed matrix ``[V, D]`` (the embedding's)."""
        return self.embedding.base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., V]`` logits for ``x [..., D]``, in x's dtype."""
        return lora_linear(x, self.base, None, None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"tied to the quantized embedding")


class QuantizedLinear(_PackedMatrix):
    """A bias-free linear layer ``y [..., N] = x [..., K] Wᵀ`` over its own packed
    ``QuantizedWeight`` (an untied GGUF ``output.weight``), through ``lora_linear``."""

    def __init__(self, base: QuantizedWeight) -> None:
        super().__init__()
        self._hold(base)
        self.out_features, self.in_features = base.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., N]`` for ``x [..., K]``, in x's dtype."""
        return lora_linear(x, self.base, None, None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"base={self.base!r}")
