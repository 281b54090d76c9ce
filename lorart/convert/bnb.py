"""bitsandbytes NF4 (``Params4bit``, QLoRA) -> ``QuantizedWeight``.

bitsandbytes flattens ``W [N, K]`` row-major, quantizes blocks of ``blocksize``
consecutive values (default 64) against their ``absmax`` (float32) and packs two
codes a byte with the FIRST value in the HIGH nibble:

    data    uint8 [N·K/2] (any shape with that many bytes, e.g. [N·K/2, 1])
    absmax  float32 [N·K / blocksize]
    W.flat[2i] = NF4[data[i] >> 4] · absmax[2i // bs],  W.flat[2i+1] = NF4[data[i] & 15] · ...

When K is a multiple of ``blocksize`` the blocks are lorart groups along K; lorart
keeps the float32 absmax as scales (scheme ``nf4``). Double-quantized statistics
(``compress_statistics=True``) must be dequantized to a float32 absmax first.
"""

from __future__ import annotations

import torch

from ..quant import GROUP_SIZES, QuantizedWeight, pack_codes


def from_bnb_nf4(data: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, int],
                 blocksize: int = 64) -> QuantizedWeight:
    """Convert bitsandbytes NF4 ``data``/``absmax`` (see module doc) for ``W [N, K]``."""
    n, k = shape
    if blocksize not in GROUP_SIZES:
        raise ValueError(f"blocksize={blocksize} is not a lorart group size {GROUP_SIZES}")
    if k % blocksize:
        raise ValueError(f"K={k} is not a multiple of blocksize={blocksize}: bitsandbytes "
                         f"blocks would straddle rows")
    if data.dtype != torch.uint8 or data.numel() * 2 != n * k:
        raise ValueError(f"data must be uint8 with N*K/2={n * k // 2} bytes, got {data.dtype} "
                         f"with {data.numel()}")
    if absmax.dtype != torch.float32 or absmax.numel() != n * k // blocksize:
        raise ValueError(f"absmax must be float32 with N*K/blocksize={n * k // blocksize} "
                         f"values, got {absmax.dtype} with {absmax.numel()} (dequantize "
                         f"nested statistics first)")
    flat = data.reshape(-1)
    codes = torch.stack((flat >> 4, flat & 15), dim=-1).reshape(n, k)
    scales = absmax.reshape(n, k // blocksize).contiguous()
    return QuantizedWeight(pack_codes(codes).contiguous(), scales, None, blocksize, "nf4")
