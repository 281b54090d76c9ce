"""GGUF Q4_0 / Q4_1 blocks -> ``QuantizedWeight`` (exact: codes and fp16 scales move as is).

A GGUF tensor ``[N, K]`` (``ne0 = K``) is stored row by row in blocks of 32 values:

    Q4_0  fp16 d, 16 bytes qs            value = d · (q − 8)      -> scheme "sym"
    Q4_1  fp16 d, fp16 m, 16 bytes qs    value = d · q + m        -> scheme "asym"

Within a block, byte j holds element j in its low nibble and element j + 16 in its
high nibble (ggml's order), whereas lorart packs neighbours (2j, 2j + 1) into one
byte; the converter reorders the nibbles. ``d`` and ``m`` become ``scales`` and
``offsets`` unchanged (float16), so ``dequantize`` equals GGUF's own arithmetic.
"""

from __future__ import annotations

import numpy as np
import torch

from ..quant import QuantizedWeight, pack_codes

BLOCK = 32
_LAYOUT = {"Q4_0": (18, "sym"), "Q4_1": (20, "asym")}  # bytes per block, scheme


def from_gguf_q4(data: np.ndarray | torch.Tensor, kind: str, shape: tuple[int, int] | None = None
                 ) -> QuantizedWeight:
    """Convert raw GGUF ``Q4_0``/``Q4_1`` bytes to a ``QuantizedWeight`` ``[N, K]``.

    Args:
        data: uint8 ``[N, K / 32 · bytes_per_block]`` (what ``gguf.GGUFReader`` gives as
            ``tensor.data``) or flat bytes with ``shape``.
        kind: ``"Q4_0"`` or ``"Q4_1"`` (a ``GGMLQuantizationType`` name also works).
        shape: ``(N, K)`` of the dense weight, needed for flat input.
    """
    kind = getattr(kind, "name", kind)
    if kind not in _LAYOUT:
        raise ValueError(f"kind must be 'Q4_0' or 'Q4_1', got {kind!r}")
    block_bytes, scheme = _LAYOUT[kind]
    raw = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    if raw.dtype != np.uint8:
        raise TypeError(f"data must be uint8 bytes, got {raw.dtype}")
    if shape is None:
        if raw.ndim != 2 or raw.shape[1] % block_bytes:
            raise ValueError(f"data must be [N, K/32*{block_bytes}] bytes for {kind}, got "
                             f"{raw.shape}; pass shape=(N, K) for flat data")
        n, k = raw.shape[0], raw.shape[1] // block_bytes * BLOCK
    else:
        n, k = shape
        if k % BLOCK or raw.size != n * k // BLOCK * block_bytes:
            raise ValueError(f"{raw.size} bytes do not hold a {kind} tensor of shape {shape}")
    blocks = np.ascontiguousarray(raw).reshape(n, k // BLOCK, block_bytes)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0] if scheme == "asym" else None
    qs = blocks[..., block_bytes - 16:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, k)  # ggml order
    qweight = pack_codes(torch.from_numpy(codes))
    scales = torch.from_numpy(np.ascontiguousarray(d))
    offsets = None if m is None else torch.from_numpy(np.ascontiguousarray(m))
    return QuantizedWeight(qweight.contiguous(), scales, offsets, BLOCK, scheme)


def gguf_row_permutation(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order undoing llama.cpp's Q/K permutation: ``W_hf = W_gguf[perm]``.

    llama.cpp's converter interleaves the two rotary halves of each head; transformers'
    GGUF loader reshapes ``[n_head, dim, 2, K]`` and swaps axes 1 and 2 to undo it.
    Applied to packed rows (codes and scales move together) this stays exact.
    """
    if n_rows % (2 * n_head):
        raise ValueError(f"{n_rows} rows do not split into {n_head} heads of even size")
    dim = n_rows // n_head // 2
    idx = torch.arange(n_rows).reshape(n_head, dim, 2)
    return idx.transpose(1, 2).reshape(-1)


def permute_rows(qw: QuantizedWeight, perm: torch.Tensor) -> QuantizedWeight:
    """The same weight with rows reordered (``W[perm]``), still packed."""
    return QuantizedWeight(qw.qweight[perm].contiguous(), qw.scales[perm].contiguous(),
                           None if qw.offsets is None else qw.offsets[perm].contiguous(),
                           qw.group_size, qw.scheme)
