"""GGUF quantized blocks -> ``QuantizedWeight``, exactly (codes and scales move, never round).

    Q4_0 Q4_1 Q4_K            -> 4-bit (sym / asym; Q4_K: asym, group 32, fp32 scales)
    Q5_0 Q5_1 Q5_K Q6_K Q8_0  -> 8-bit ``int8`` (group 32; Q6_K: group 16)

``from_gguf_quantized(data, kind)`` is the entry point; ``QUANTIZED_TYPES`` lists the
type names it takes. The details of the 4-bit types:

A GGUF tensor ``[N, K]`` (``ne0 = K``) is stored row by row in blocks of 32 values:

    Q4_0  fp16 d, 16 bytes qs            value = d · (q − 8)      -> scheme "sym"
    Q4_1  fp16 d, fp16 m, 16 bytes qs    value = d · q + m        -> scheme "asym"

Within a block, byte j holds element j in its low nibble and element j + 16 in its
high nibble (ggml's order), whereas lorart packs neighbours (2j, 2j + 1) into one
byte; the converter reorders the nibbles. ``d`` and ``m`` become ``scales`` and
``offsets`` unchanged (float16), so ``dequantize`` equals GGUF's own arithmetic.

K-quants (super-blocks of 256 values) keep per-sub-block 6-bit scale/min integers and two
fp16 super-scales; GGUF computes ``(d·sc)·q − (dmin·m)`` in float32, and both products are
exact in float32 (11-bit by 6-bit mantissas), so they become fp32 ``scales = d·sc`` and
``offsets = −(dmin·m)`` and ``scale·q + offset`` reproduces GGUF's value bit for bit.
Q6_K: ``(d·sc)·(q − 32)`` with an int8 ``sc`` per 16 values -> int8 codes ``q − 32``, group
16. The 5/6-bit codes are rebuilt with the same bit operations as ``gguf.quants``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..quant import QuantizedWeight, pack_codes

BLOCK = 32
QK_K = 256  # values per K-quant super-block
_LAYOUT = {"Q4_0": (18, "sym"), "Q4_1": (20, "asym")}  # bytes per block, scheme
# values per block, bytes per block (as gguf.constants.GGML_QUANT_SIZES)
_BLOCKS = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24),
           "Q8_0": (32, 34), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}
QUANTIZED_TYPES = tuple(_BLOCKS)


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
    blocks, n, k = _blocks(data, kind, shape)
    d = _half(blocks[..., 0:2])
    m = _half(blocks[..., 2:4]) if scheme == "asym" else None
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


# --------------------------------------------------------------------------- all types
def _blocks(data, kind: str, shape: tuple[int, int] | None) -> tuple[np.ndarray, int, int]:
    """Raw bytes -> ``(blocks [N, K / block, bytes_per_block] uint8, N, K)``."""
    values, block_bytes = _BLOCKS[kind]
    raw = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    if raw.dtype != np.uint8:
        raise TypeError(f"data must be uint8 bytes, got {raw.dtype}")
    if shape is None:
        if raw.ndim != 2 or raw.shape[1] % block_bytes:
            raise ValueError(f"data must be [N, K/{values}*{block_bytes}] bytes for {kind}, "
                             f"got {raw.shape}; pass shape=(N, K) for flat data")
        n, k = raw.shape[0], raw.shape[1] // block_bytes * values
    else:
        n, k = shape
        if k % values or raw.size != n * k // values * block_bytes:
            raise ValueError(f"{raw.size} bytes do not hold a {kind} tensor of shape {shape}")
    return np.ascontiguousarray(raw).reshape(n, k // values, block_bytes), n, k


def _half(b: np.ndarray) -> np.ndarray:
    """fp16 values from the last axis' 2 bytes (a block's ``d`` or ``m``), as float16."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0]


def _f16(b: np.ndarray) -> np.ndarray:
    """fp16 values from the last axis' 2 bytes, as float32 (exact)."""
    return _half(b).astype(np.float32)


def _nibbles(qs: np.ndarray, span: int) -> np.ndarray:
    """ggml's nibble order: for each ``span`` bytes, their low nibbles then high nibbles."""
    lead = qs.shape[:-1]
    q = qs.reshape(*lead, -1, 1, span) >> np.array([0, 4], dtype=np.uint8).reshape(2, 1)
    return (q & 0x0F).reshape(*lead, -1)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins of a Q4_K/Q5_K super-block (12 packed bytes)."""
    d, m, m_d = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _int8_weight(codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray | None,
                 n: int, k: int, group: int) -> QuantizedWeight:
    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a.reshape(n, k // group)))

    return QuantizedWeight(torch.from_numpy(np.ascontiguousarray(codes.reshape(n, k))
                                            .astype(np.int8)),
                           t(scales), None if offsets is None else t(offsets), group, "int8")


def _low_bits32(blocks: np.ndarray, start: int) -> np.ndarray:
    """Bit j (0..31) of the little-endian uint32 at ``start`` of each 32-value block."""
    qh = blocks[..., start:start + 4].copy().view(np.uint32)
    return ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def from_gguf_quantized(data: np.ndarray | torch.Tensor, kind,
                        shape: tuple[int, int] | None = None) -> QuantizedWeight:
    """Convert raw GGUF bytes of a quantized type to a ``QuantizedWeight`` ``[N, K]``.

    Args:
        data: uint8 ``[N, K / block · bytes_per_block]`` (``gguf.GGUFReader``'s
            ``tensor.data``) or flat bytes with ``shape``.
        kind: a name in ``QUANTIZED_TYPES`` or a ``GGMLQuantizationType``.
        shape: ``(N, K)`` of the dense weight, needed for flat input.

    ``dequantize()`` of the result equals ``gguf.quants.dequantize`` bit for bit.
    """
    kind = getattr(kind, "name", kind)
    if kind not in _BLOCKS:
        raise ValueError(f"kind must be one of {QUANTIZED_TYPES}, got {kind!r}")
    if kind in _LAYOUT:
        return from_gguf_q4(data, kind, shape)
    blocks, n, k = _blocks(data, kind, shape)
    if kind == "Q8_0":
        codes = blocks[..., 2:].copy().view(np.int8)
        return _int8_weight(codes, _half(blocks[..., 0:2]), None, n, k, BLOCK)
    if kind in ("Q5_0", "Q5_1"):
        asym = kind == "Q5_1"
        d = _half(blocks[..., 0:2])
        m = _half(blocks[..., 2:4]) if asym else None
        start = 4 if asym else 2
        q = _nibbles(blocks[..., start + 4:], 16) | (_low_bits32(blocks, start) << 4)
        codes = q.astype(np.int16) - (0 if asym else 16)
        return _int8_weight(codes, d, m, n, k, BLOCK)
    if kind in ("Q4_K", "Q5_K"):
        d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
        sc, mn = _k_scale_min(blocks[..., 4:16])
        scales = d[..., None] * sc           # [N, K/256, 8], exact in float32
        offsets = -(dmin[..., None] * mn)
        if kind == "Q4_K":
            q = _nibbles(blocks[..., 16:], 32)
            qweight = pack_codes(torch.from_numpy(q.reshape(n, k)))
            return QuantizedWeight(qweight.contiguous(),
                                   torch.from_numpy(np.ascontiguousarray(scales.reshape(n, -1))),
                                   torch.from_numpy(np.ascontiguousarray(offsets.reshape(n, -1))),
                                   BLOCK, "asym")
        qh = blocks[..., 16:48]                                   # [.., 32]: bit j of value j
        high = (qh[..., None, :] >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & 1
        q = _nibbles(blocks[..., 48:], 32) | (high.reshape(n, -1, QK_K) << 4)
        return _int8_weight(q, scales, offsets, n, k, BLOCK)
    # Q6_K: ql [128], qh [64], scales int8 [16], d fp16
    ql, qh = blocks[..., 0:128], blocks[..., 128:192]
    sc = blocks[..., 192:208].copy().view(np.int8).astype(np.float32)
    d = _f16(blocks[..., 208:210])
    low = _nibbles(ql.reshape(n, -1, 2, 64), 64).reshape(n, -1, 2, 64)  # per 128-value half
    high = (qh.reshape(n, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)) & 3
    q = low.reshape(n, -1, 2, 4, 32) | (high << 4)
    codes = q.reshape(n, -1, QK_K).astype(np.int16) - 32
    return _int8_weight(codes, d[..., None] * sc, None, n, k, 16)
