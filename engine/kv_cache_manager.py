"""Per-request view of the KV cache: each request's block table over a :class:`BlockPool`.

The manager speaks in requests and tokens (``allocate(req_id, num_tokens)``,
``free(req_id)``); the pool speaks in blocks. A request's block table only grows
while it runs and is freed all at once. Any id may own a block table: a running
request, a prefill request held until its KV is pushed, or a decode worker's
reservation for a remote prefill (the scheduler decides which).
"""

from __future__ import annotations

from engine.block_pool import BlockPool, KVCacheBlock


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative ``a`` by positive ``b``."""
    return -(-a // b)


class KVCacheManager:
    """Allocates and frees block tables of requests.

    Args:
        block_pool: the pool to draw blocks from.
    """

    def __init__(self, block_pool: BlockPool) -> None:
        self.block_pool = block_pool
        self.block_size = block_pool.block_size
        self._blocks: dict[str, list[KVCacheBlock]] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks not held by any request."""
        return self.block_pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by at least one request."""
        return self.block_pool.num_used_blocks

    @property
    def num_total_blocks(self) -> int:
        """Blocks in the pool."""
        return self.block_pool.num_blocks

    def num_blocks_needed(self, num_tokens: int, req_id: str | None = None) -> int:
        """New blocks needed so ``req_id``'s table covers ``num_tokens`` tokens (0 if it already does)."""
        held = len(self._blocks.get(req_id, ())) if req_id is not None else 0
        return max(cdiv(num_tokens, self.block_size) - held, 0)

    def can_allocate(self, num_tokens: int, req_id: str | None = None) -> bool:
        """Whether :meth:`allocate` for ``num_tokens`` tokens would succeed now.

        Args:
            num_tokens: tokens the request's block table must cover in total.
            req_id: the request (blocks it already holds count); ``None`` for a new one.
        """
        return self.num_blocks_needed(num_tokens, req_id) <= self.block_pool.num_free_blocks

    def allocate(self, req_id: str, num_tokens: int) -> list[int]:
        """Grow ``req_id``'s block table to cover ``num_tokens`` tokens.

        Returns:
            The ids of the newly added blocks (empty when none were needed).

        Raises:
            CapacityExceeded: not enough free blocks; nothing is allocated.
        """
        needed = self.num_blocks_needed(num_tokens, req_id)
        if needed == 0:
            self._blocks.setdefault(req_id, [])
            return []
        new_blocks = self.block_pool.get_new_blocks(needed)
        self._blocks.setdefault(req_id, []).extend(new_blocks)
        return [b.block_id for b in new_blocks]

    def free(self, req_id: str) -> int:
        """Free every block of ``req_id`` (no-op for an unknown id).

        Blocks are freed tail first, so the end of a sequence is evicted before
        its (more shareable) beginning.

        Returns:
            Number of blocks released.
        """
        blocks = self._blocks.pop(req_id, [])
        self.block_pool.free_blocks(reversed(blocks))
        return len(blocks)

    def has_blocks(self, req_id: str) -> bool:
        """Whether ``req_id`` owns a block table (possibly empty)."""
        return req_id in self._blocks

    def get_block_table(self, req_id: str) -> list[int]:
        """Block ids of ``req_id`` in sequence order (a copy).

        Raises:
            KeyError: ``req_id`` owns no block table.
        """
        return [b.block_id for b in self._blocks[req_id]]

    def slot_mapping(self, req_id: str, start_pos: int, num_tokens: int) -> list[int]:
        """Cache slots of positions ``[start_pos, start_pos + num_tokens)``.

        Slot of position ``p`` is ``block_id * block_size + p % block_size`` with
        ``block_id = block_table[p // block_size]``.

        Raises:
            KeyError: ``req_id`` owns no block table.
            ValueError: the block table does not cover the positions.
        """
        blocks = self._blocks[req_id]
        end = start_pos + num_tokens
        if start_pos < 0 or end > len(blocks) * self.block_size:
            raise ValueError(f"positions [{start_pos}, {end}) are not covered by the block table")
        bs = self.block_size
        return [blocks[p // bs].block_id * bs + p % bs for p in range(start_pos, end)]
