"""Block sizes and path choices for the Triton kernels, as named, lazily evaluated functions.

Nothing here runs at import: every function is called by a launcher with the sizes of
the call, and results are cached on *bucketed* sizes (the next power of two of the row
count, clamped), so a new batch size maps to a bucket already seen and never triggers a
recompile of its own.

Status of the numbers below: **not yet measured on a GPU**. They are starting points
chosen from the shape of the work (tl.dot needs every block dim >= 16; a 4-bit K block
must stay inside one quantization group so a tile needs one scale per output row), and
are meant to be replaced by what ``python benchmarks/gpu_check.py`` measures on a lent
GPU. Under ``TRITON_INTERPRET=1`` the same configs run, so CI exercises exactly the
block shapes a GPU would use.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

# Rows at or below which a multi-adapter batch takes the fused BGMV path (each row gathers
# its own adapter inside the base GEMV tile, one launch) instead of the SGMV split path.
# Reason: at decode sizes the layer is bound by reading the base weight, which the fused
# kernel reads once for all rows; the per-row gathers of A and B are small next to it.
# Above one 16-row tile the gathered 3-D LoRA tiles grow with the rows, while SGMV keeps
# tensor-core dots per adapter segment. Not yet measured on a GPU.
DECODE_MAX_ROWS = 16

# Rows at or above which a *dense* single-adapter layer runs the base on the library GEMM
# (torch.matmul / cuBLAS) plus shrink/expand, instead of the fused kernel: at prefill
# sizes cuBLAS is the ceiling for the base GEMM, and the fused kernel recomputes x·Aᵀ in
# every N tile (r / BLOCK_N extra FLOPs, ~12% at r=16, BLOCK_N=128). Quantized bases stay
# fused (dequantizing in registers saves materializing W). Not yet measured on a GPU.
DENSE_LIBRARY_GEMM_MIN_ROWS = 256

# Gathered (BGMV) LoRA tiles are [rows, rank-block, K-block] in registers; 16 is the
# smallest rank block tl.dot-based paths use and keeps that 3-D tile at 8K elements.
GATHER_RANK_BLOCK = 16

# Decode grids are tiny (one row tile x N / BLOCK_N tiles: 64 programs for N=4096), too
# few to keep a GPU's memory system busy (132 SMs on an H100/H200). Split-K multiplies the
# programs up to about this many; each split still loops over >= MIN_K_BLOCKS_PER_SPLIT K
# blocks so its loads pipeline. Partial sums (fp32) are reduced by a second tiny launch,
# in split order (deterministic, no atomics). A fixed target, not a device query, so the
# choice is the same under the interpreter and CI exercises it. Not yet measured on a GPU.
SPLIT_K_TARGET_PROGRAMS = 264
SPLIT_K_MAX = 16
MIN_K_BLOCKS_PER_SPLIT = 2


@dataclass(frozen=True)
class Blocks:
    """Tile sizes of one launch (all powers of two, each >= 16 where tl.dot reads them)."""

    m: int
    n: int
    k: int
    r: int = 16
    num_warps: int = 4
    split_k: int = 1


def next_power_of_2(v: int) -> int:
    return 1 if v <= 1 else 1 << (int(v) - 1).bit_length()


def bucket_rows(m: int) -> int:
    """The row bucket a launch is keyed on: next power of two, clamped to 16..4096."""
    return min(max(next_power_of_2(m), 16), 4096)


def rank_block(max_rank: int) -> int:
    """A rank block that holds a whole rank up to 128 (>= 16 for tl.dot; masks pad it)."""
    return min(max(next_power_of_2(max_rank), 16), 128)


def forward_path(m: int, quantized: bool, multi_adapter: bool, has_lora: bool) -> str:
    """Which forward runs: ``"fused"``, ``"fused_gather"``, ``"split"`` or ``"library"``.

    - base only, dense, many rows: ``"library"`` (torch.matmul is the ceiling).
    - one adapter: ``"fused"`` (base + LoRA in one launch), except dense at prefill sizes
      where ``"split"`` (library GEMM + shrink/expand) wins on paper.
    - many adapters: ``"fused_gather"`` (BGMV) for decode-sized batches, else ``"split"``
      (SGMV shrink/expand over the batch's adapter segments, after the base).
    Not yet measured on a GPU; see the constants above.
    """
    if not has_lora:
        return "library" if (not quantized and m >= DENSE_LIBRARY_GEMM_MIN_ROWS) else "fused"
    if multi_adapter:
        return "fused_gather" if m <= DECODE_MAX_ROWS else "split"
    if not quantized and m >= DENSE_LIBRARY_GEMM_MIN_ROWS:
        return "split"
    return "fused"


def quant_block_k(block_k: int, group_size: int) -> int:
    """The K block for a base of ``group_size`` (0: dense): at most one quantization group,
    so a tile needs one scale per output row, but never under 32. Only the 8-bit layout
    has a smaller group (16, GGUF Q6_K); its tiles then span two groups and
    ``weights.weight_tile`` loads a scale per column. 32 rather than tl.dot's floor of 16:
    a 16-wide K loop halves the bytes each load moves. Not measured on a GPU."""
    return min(block_k, max(group_size, 32)) if group_size else block_k


@lru_cache(maxsize=256)
def fused_forward_blocks(m_bucket: int, n: int, k: int, group_size: int, gather: bool,
                         max_rank: int) -> Blocks:
    """Tiles of the fused base(+LoRA) kernel, keyed on the row bucket.

    Decode (m_bucket 16): 16-row tiles (tl.dot's minimum), BLOCK_N 64 so a single adapter's
    A is re-read by N/64 programs only (from L2), K blocks of up to 128 (one quantization
    group at most) and split-K for enough programs. The gathered LoRA tile
    [16, 16, BLOCK_K] bounds BLOCK_K at 32 and BLOCK_N at 32 on the gather path.
    Prefill: 64x128 tiles with K blocks of 64, the usual starting point of a Triton GEMM
    on Hopper; no split-K (enough tiles already).
    """
    block_k = quant_block_k(32 if gather else (128 if m_bucket <= 16 else 64), group_size)
    if m_bucket <= 16:
        block_n = 32 if gather else 64
        tiles = -(-n // block_n)
        k_blocks = -(-k // block_k)
        split = next_power_of_2(-(-SPLIT_K_TARGET_PROGRAMS // tiles))
        while split > 1 and (split > SPLIT_K_MAX or k_blocks < split * MIN_K_BLOCKS_PER_SPLIT):
            split //= 2
        return Blocks(m=16, n=block_n, k=block_k, r=rank_block(max_rank), split_k=split)
    if m_bucket <= 64:
        return Blocks(m=m_bucket, n=64, k=block_k, r=rank_block(max_rank))
    return Blocks(m=64, n=128, k=block_k, r=rank_block(max_rank), num_warps=8)


@lru_cache(maxsize=256)
def dx_blocks(m_bucket: int, n: int, k: int, group_size: int) -> Blocks:
    """Tiles of ``dX = dY·W``; the K (output) block as in :func:`quant_block_k`."""
    block_k = quant_block_k(64, group_size)
    block_m = 16 if m_bucket <= 16 else 64
    return Blocks(m=block_m, n=64, k=block_k, num_warps=4 if block_m == 16 else 8)


@lru_cache(maxsize=256)
def sgmv_blocks(m_bucket: int, inner: int, outer: int) -> Blocks:
    """Tiles of shrink / expand / per-segment reductions (rank dim padded to 16 by masks)."""
    block_m = 16 if m_bucket <= 16 else (32 if m_bucket <= 256 else 64)
    return Blocks(m=block_m, n=64, k=64, r=16)
