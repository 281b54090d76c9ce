"""A paged KV cache: fixed-size blocks, a free list, one block table per sequence.

Storage per layer is one flat slot array (``num_blocks * block_size`` token slots):

    k[layer]   [num_slots, num_kv_heads, head_dim]
    v[layer]   [num_slots, num_kv_heads, head_dim]

Token ``p`` of a sequence with block table ``[b0, b1, ...]`` lives in slot
``table[p // block_size] * block_size + p % block_size``. A sequence grows one block
at a time, so nothing is reserved up front for ``max_tokens``; the engine preempts
(frees and later recomputes) a sequence when no block is left.
"""

from __future__ import annotations

import torch


class BlockAllocator:
    """Free list of ``num_blocks`` block ids. ``allocate`` never over-commits."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """``n`` block ids, or ``None`` (nothing taken) when fewer are free."""
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class PagedKVCache:
    """K/V storage of every attention layer plus the block allocator (see module doc)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int,
                 block_size: int = 16, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        slots = num_blocks * block_size
        self.k = [torch.zeros(slots, num_kv_heads, head_dim, dtype=dtype, device=device)
                  for _ in range(num_layers)]
        self.v = [torch.zeros_like(t) for t in self.k]

    @staticmethod
    def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                        dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * elem

    @property
    def capacity_tokens(self) -> int:
        return self.allocator.num_blocks * self.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Flat slot ids ``[end - start]`` (int64) of token positions ``start..end-1``."""
        pos = torch.arange(start, end, dtype=torch.int64)
        table = torch.tensor(block_table, dtype=torch.int64)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size
