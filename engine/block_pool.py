"""The pool of KV cache blocks: free queue, reference counts, prefix-cache map.

Every block id in ``[0, num_blocks)`` is usable; there is **no reserved null
block** (a runner that needs a padding slot uses slot ``-1``). Free blocks sit in
a doubly linked queue, initially in id order: allocation pops from the head and
freeing appends to the tail, so the head is always the least recently freed
block. A freed block keeps its hash (if it was cached) until it is reused, so a
later request with the same prefix can take it back with :meth:`BlockPool.touch`
(O(1) removal from the middle of the queue). When a cached free block is popped
for reuse, its hash is evicted from the map. Layering follows vLLM v1's
``BlockPool`` (free queue + hash map, per-block verbs); the code is Tandem's own.

Every registration (:meth:`BlockPool.cache_full_block`) and eviction of a hash
is reported to the optional :class:`KvEventSink` (``engine/kv_events.py``
publishes them to Redis as KV events).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from engine.errors import CapacityExceeded


class KvEventSink(Protocol):
    """Receives the prefix cache's changes, on the thread that owns the pool."""

    def block_stored(self, block_hash: bytes) -> None:
        """``block_hash`` (32 bytes) entered the prefix cache."""

    def block_removed(self, block_hash: bytes) -> None:
        """``block_hash`` left the prefix cache (its block was evicted for reuse)."""


class BlockPoolInvariantError(AssertionError):
    """The pool's bookkeeping was misused (double free, bad cache call): a bug."""


class KVCacheBlock:
    """One block of ``block_size`` token slots.

    Attributes:
        block_id: index of the block in the KV cache tensors.
        ref_cnt: number of requests holding the block; 0 means it is in the
            free queue.
        block_hash: chained hash of the full block's tokens (32 bytes) when the
            block is in the prefix cache, else ``None``.
        prev_free, next_free: links of the free queue (``None`` when not queued).
    """

    __slots__ = ("block_hash", "block_id", "next_free", "prev_free", "ref_cnt")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: bytes | None = None
        self.prev_free: KVCacheBlock | None = None
        self.next_free: KVCacheBlock | None = None

    def __repr__(self) -> str:
        return f"KVCacheBlock(block_id={self.block_id}, ref_cnt={self.ref_cnt})"


class FreeBlockQueue:
    """Doubly linked queue of free blocks with O(1) popleft, append and remove."""

    def __init__(self, blocks: Iterable[KVCacheBlock]) -> None:
        self._head = KVCacheBlock(-1)  # sentinels: never handed out
        self._tail = KVCacheBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self._len = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._len

    def popleft(self) -> KVCacheBlock:
        """Remove and return the head (least recently freed) block."""
        block = self._head.next_free
        if block is None or block is self._tail:
            raise BlockPoolInvariantError("pop from an empty free queue")
        self.remove(block)
        return block

    def append(self, block: KVCacheBlock) -> None:
        """Put ``block`` at the tail."""
        if block.prev_free is not None or block.next_free is not None:
            raise BlockPoolInvariantError(f"block {block.block_id} is already in the free queue")
        last = self._tail.prev_free
        assert last is not None
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self._len += 1

    def remove(self, block: KVCacheBlock) -> None:
        """Unlink ``block`` from wherever it is in the queue."""
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise BlockPoolInvariantError(f"block {block.block_id} is not in the free queue")
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self._len -= 1

    def block_ids(self) -> list[int]:
        """Ids from head to tail (O(n); for tests and debugging)."""
        ids = []
        block = self._head.next_free
        while block is not None and block is not self._tail:
            ids.append(block.block_id)
            block = block.next_free
        return ids


class BlockPool:
    """Owns every :class:`KVCacheBlock` of one KV cache.

    Args:
        num_blocks: blocks in the cache (>= 1).
        block_size: tokens per block (>= 1).
        event_sink: told of every hash stored in or evicted from the prefix cache.
    """

    def __init__(self, num_blocks: int, block_size: int, event_sink: KvEventSink | None = None) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self._cached: dict[bytes, KVCacheBlock] = {}
        self.event_sink = event_sink
        #: Cached blocks evicted for reuse since the pool was built (blocks).
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ``ref_cnt == 0`` (including cached ones that can be evicted)."""
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by at least one request."""
        return self.num_blocks - len(self.free_queue)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks whose hash is in the prefix-cache map (held or free)."""
        return len(self._cached)

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Pop ``num_blocks`` blocks from the free queue head, each with ``ref_cnt`` 1.

        A popped block that was cached loses its hash (evicted from the map).

        Raises:
            CapacityExceeded: fewer than ``num_blocks`` free blocks; nothing is taken.
        """
        if num_blocks > len(self.free_queue):
            raise CapacityExceeded(f"need {num_blocks} KV blocks, {len(self.free_queue)} free")
        blocks = []
        for _ in range(num_blocks):
            block = self.free_queue.popleft()
            if block.block_hash is not None:
                self._evict(block)
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def free_blocks(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference to each block; blocks reaching 0 go to the queue tail in order.

        Raises:
            BlockPoolInvariantError: a block is already free (double free).
        """
        for block in blocks:
            if block.ref_cnt <= 0:
                raise BlockPoolInvariantError(f"double free of block {block.block_id}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Add one reference to each block, taking free ones out of the queue (O(1) each)."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def cache_full_block(self, block: KVCacheBlock, block_hash: bytes) -> bool:
        """Register a held, full block under ``block_hash``.

        Returns:
            True when registered; False when another block already holds this
            hash (the first one stays the cached copy; ``block`` stays uncached).

        Raises:
            BlockPoolInvariantError: ``block`` is free or already cached.
        """
        if block.ref_cnt <= 0 or block.block_hash is not None:
            raise BlockPoolInvariantError(f"cannot cache block {block.block_id}")
        if block_hash in self._cached:
            return False
        block.block_hash = block_hash
        self._cached[block_hash] = block
        if self.event_sink is not None:
            self.event_sink.block_stored(block_hash)
        return True

    def _evict(self, block: KVCacheBlock) -> None:
        assert block.block_hash is not None
        del self._cached[block.block_hash]
        self.num_evictions += 1
        if self.event_sink is not None:
            self.event_sink.block_removed(block.block_hash)
        block.block_hash = None

    def get_cached_block(self, block_hash: bytes) -> KVCacheBlock | None:
        """The block cached under ``block_hash`` (held or free), or ``None``."""
        return self._cached.get(block_hash)

    def cached_hashes(self) -> list[bytes]:
        """Every hash in the prefix cache (held or free), in registration order."""
        return list(self._cached)
