"""The paged KV cache's block pool.

Block 0 is the null block: padding tokens write there and no request ever owns it.
A request of ``seq_len`` tokens holds ``ceil(seq_len / block_size)`` blocks; its row
of the block table lists them, and token ``pos`` lives in slot
``block_table[req, pos // block_size] * block_size + pos % block_size``.
"""

from __future__ import annotations

NULL_BLOCK = 0


class BlockPool:
    """Free-list allocator over blocks ``1 .. num_blocks - 1``."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, NULL_BLOCK, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, seq_len: int) -> int:
        return -(-seq_len // self.block_size)

    def allocate(self, seq_len: int) -> list[int]:
        """Blocks for a request of ``seq_len`` tokens; ValueError when the pool is short."""
        need = self.blocks_for(seq_len)
        if need > len(self._free):
            raise ValueError(
                f"KV cache pool too small: a request of {seq_len} tokens needs {need} blocks of "
                f"{self.block_size}, {len(self._free)} of {self.num_blocks - 1} are free; "
                f'raise "num_blocks"'
            )
        return [self._free.pop() for _ in range(need)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))

    def snapshot(self) -> list[int]:
        return list(self._free)

    def restore(self, state: list[int]) -> None:
        self._free = list(state)
