"""Per-request view of the KV cache: each request's block table over a :class:`BlockPool`.

The manager speaks in requests and tokens (``allocate(req_id, num_tokens)``,
``free(req_id)``); the pool speaks in blocks. A request's block table only grows
while it runs and is freed all at once. Any id may own a block table: a running
request, a prefill request held until its KV is pushed, or a decode worker's
reservation for a remote prefill (the scheduler decides which).

Prefix caching (``enable_prefix_caching``): a full, computed block is
registered in the pool's hash map under the chained hash of its tokens
(``engine/hashing.py``, rooted at the model id and the request's
``cache_salt``) by :meth:`KVCacheManager.cache_full_blocks`; a new request's
longest run of cached leading blocks (:meth:`KVCacheManager.find_cached_prefix`)
is shared (reference count + 1) instead of computed. Freed blocks keep their
hash at reference count 0 and are evicted least recently freed first, when the
pool hands them out again.

Forking (``n`` > 1 completions): :meth:`KVCacheManager.fork` gives every
completion a block table sharing all of the prompt's blocks (reference counts,
no copy). A completion about to write into a block that others still hold
(the prompt's last, partially filled block) first takes a private copy
(:meth:`KVCacheManager.copy_on_write`); the runner copies the block's keys and
values. The last holder writes in place, so every block is freed exactly once.

Deferred frees (asynchronous scheduling): a request that ends while a step
that writes its blocks may still run on the device gives its block table up
at once (the id can be reused) but its blocks stay taken until
:meth:`KVCacheManager.free_deferred`, called once that step has completed;
otherwise a KV transfer could reserve a freed block and write it while the
step still does.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.block_pool import BlockPool, KVCacheBlock
from engine.errors import CapacityExceeded
from engine.hashing import hash_block_tokens, root_hash
from engine.request import Request


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative ``a`` by positive ``b``."""
    return -(-a // b)


class KVCacheManager:
    """Allocates and frees block tables of requests.

    Args:
        block_pool: the pool to draw blocks from.
        enable_prefix_caching: register full blocks and reuse cached prefixes.
        model_id: mixed into every block hash (see ``engine.hashing.root_hash``).
    """

    def __init__(
        self, block_pool: BlockPool, *, enable_prefix_caching: bool = False, model_id: str = ""
    ) -> None:
        self.block_pool = block_pool
        self.block_size = block_pool.block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.model_id = model_id
        self._blocks: dict[str, list[KVCacheBlock]] = {}
        self._block_ids: dict[str, list[int]] = {}  # ids of _blocks, kept in step (hot path reads)
        self._hashes: dict[str, list[bytes]] = {}  # hashes of each request's leading full blocks
        self._deferred: list[list[KVCacheBlock]] = []  # freed tables a running step may still write

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

    def can_allocate(
        self,
        num_tokens: int,
        req_id: str | None = None,
        cached_blocks: Sequence[KVCacheBlock] = (),
    ) -> bool:
        """Whether :meth:`allocate` for ``num_tokens`` tokens would succeed now.

        Args:
            num_tokens: tokens the request's block table must cover in total.
            req_id: the request (blocks it already holds count); ``None`` for a new one.
            cached_blocks: cached leading blocks a new request would share
                (from :meth:`find_cached_prefix`); free ones leave the free queue.

        A running request that may write into a shared block also needs
        :meth:`num_copy_on_write_blocks` more (the scheduler adds them).
        """
        needed = self.num_blocks_needed(num_tokens, req_id) - len(cached_blocks)
        taken = sum(1 for b in cached_blocks if b.ref_cnt == 0)
        return needed <= self.block_pool.num_free_blocks - taken

    def find_cached_prefix(self, token_ids: Sequence[int], cache_salt: str = "") -> list[KVCacheBlock]:
        """The longest run of cached blocks holding ``token_ids``' leading full blocks.

        At most ``(len(token_ids) - 1) // block_size`` blocks, so at least the
        last token is left to compute (a step must compute a token to sample
        one). Nothing is taken: pass the result to :meth:`allocate`.

        Returns:
            The blocks in sequence order (empty when prefix caching is off).
        """
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        parent = root_hash(self.model_id, cache_salt)
        hits: list[KVCacheBlock] = []
        for i in range((len(token_ids) - 1) // bs):
            parent = hash_block_tokens(parent, token_ids[i * bs : (i + 1) * bs])
            block = self.block_pool.get_cached_block(parent)
            if block is None:
                break
            hits.append(block)
        return hits

    def allocate(self, req_id: str, num_tokens: int, cached_blocks: Sequence[KVCacheBlock] = ()) -> list[int]:
        """Grow ``req_id``'s block table to cover ``num_tokens`` tokens.

        Args:
            req_id: the request.
            num_tokens: tokens the block table must cover in total.
            cached_blocks: for a request without blocks yet, cached leading
                blocks (from :meth:`find_cached_prefix`) that start its block
                table; each gains a reference.

        Returns:
            The ids of the newly added blocks (empty when none were needed;
            shared cached blocks are not listed).

        Raises:
            CapacityExceeded: not enough free blocks; nothing is allocated.
        """
        if cached_blocks:
            assert req_id not in self._blocks, f"{req_id} already holds blocks"
            if not self.can_allocate(num_tokens, None, cached_blocks):
                raise CapacityExceeded(f"not enough free KV blocks for {num_tokens} tokens of {req_id}")
            self.block_pool.touch(cached_blocks)
            self._blocks[req_id] = list(cached_blocks)
            self._block_ids[req_id] = [b.block_id for b in cached_blocks]
            self._hashes[req_id] = [b.block_hash for b in cached_blocks if b.block_hash is not None]
        needed = self.num_blocks_needed(num_tokens, req_id)
        if req_id not in self._blocks:
            self._blocks[req_id] = []
            self._block_ids[req_id] = []
        if needed == 0:
            return []
        new_blocks = self.block_pool.get_new_blocks(needed)
        new_ids = [b.block_id for b in new_blocks]
        self._blocks[req_id].extend(new_blocks)
        self._block_ids[req_id].extend(new_ids)
        return new_ids

    def free(self, req_id: str, *, defer: bool = False) -> int:
        """Free every block of ``req_id`` (no-op for an unknown id).

        Blocks are freed tail first, so the end of a sequence is evicted before
        its (more shareable) beginning.

        Args:
            req_id: the request.
            defer: a step still running on the device may write these blocks:
                drop the block table now but keep the blocks taken until
                :meth:`free_deferred`.

        Returns:
            Number of blocks released (or deferred).
        """
        blocks = self._blocks.pop(req_id, [])
        self._block_ids.pop(req_id, None)
        self._hashes.pop(req_id, None)
        if defer:
            if blocks:
                self._deferred.append(blocks)
        else:
            self.block_pool.free_blocks(reversed(blocks))
        return len(blocks)

    @property
    def num_deferred_blocks(self) -> int:
        """Blocks freed with ``defer=True`` and not yet released (counted as used)."""
        return sum(len(blocks) for blocks in self._deferred)

    def free_deferred(self) -> int:
        """Release every block freed with ``defer=True``, tables in the order they were freed.

        Returns:
            Number of blocks released.
        """
        released = 0
        for blocks in self._deferred:
            self.block_pool.free_blocks(reversed(blocks))
            released += len(blocks)
        self._deferred.clear()
        return released

    def cache_full_blocks(self, request: Request, num_computed_tokens: int | None = None) -> None:
        """Register ``request``'s blocks that are full and computed in the prefix cache.

        Block ``i`` is registered once ``num_computed_tokens`` (default
        ``request.num_computed_tokens``; the scheduler passes the end of the
        step it applies, since a later step may be in flight) covers its last token; a block whose hash another block already holds stays
        unregistered (the first copy serves later requests). A no-op when
        prefix caching is off or the request holds no blocks.
        """
        if not self.enable_prefix_caching:
            return
        blocks = self._blocks.get(request.req_id)
        if blocks is None:
            return
        bs = self.block_size
        hashes = self._hashes.setdefault(request.req_id, [])
        computed = request.num_computed_tokens if num_computed_tokens is None else num_computed_tokens
        num_full = min(computed // bs, len(blocks))
        if len(hashes) >= num_full:
            return
        first = len(hashes)
        parent = hashes[-1] if hashes else root_hash(self.model_id, request.cache_salt)
        tokens = request.token_ids_between(first * bs, num_full * bs)
        for i in range(first, num_full):
            offset = (i - first) * bs
            parent = hash_block_tokens(parent, tokens[offset : offset + bs])
            hashes.append(parent)
            if blocks[i].block_hash is None:
                self.block_pool.cache_full_block(blocks[i], parent)

    def fork(self, parent_id: str, child_ids: Sequence[str]) -> None:
        """Hand ``parent_id``'s block table to each of ``child_ids``, sharing every block.

        Each block gains ``len(child_ids) - 1`` references; the parent's table ends.

        Raises:
            KeyError: ``parent_id`` owns no block table.
        """
        blocks = self._blocks.pop(parent_id)
        ids = self._block_ids.pop(parent_id)
        hashes = self._hashes.pop(parent_id, [])
        for child_id in child_ids:
            assert child_id not in self._blocks, f"{child_id} already holds blocks"
            self.block_pool.touch(blocks)
            self._blocks[child_id] = list(blocks)
            self._block_ids[child_id] = list(ids)
            self._hashes[child_id] = list(hashes)
        self.block_pool.free_blocks(reversed(blocks))

    def num_copy_on_write_blocks(self, req_id: str, write_pos: int) -> int:
        """1 when the block holding position ``write_pos`` of ``req_id`` is shared, else 0."""
        blocks = self._blocks.get(req_id)
        index = write_pos // self.block_size
        if blocks is None or index >= len(blocks):
            return 0
        return 1 if blocks[index].ref_cnt > 1 else 0

    def copy_on_write(self, req_id: str, write_pos: int) -> tuple[int, int] | None:
        """Give ``req_id`` a private copy of the shared block holding ``write_pos``.

        Returns:
            ``(src_block_id, dst_block_id)``: the caller must copy the block's
            keys and values before the next forward pass; ``None`` when the
            block is not shared (nothing to do).

        Raises:
            CapacityExceeded: no free block for the copy (check with
                :meth:`num_copy_on_write_blocks` first).
        """
        if not self.num_copy_on_write_blocks(req_id, write_pos):
            return None
        blocks = self._blocks[req_id]
        index = write_pos // self.block_size
        (copy,) = self.block_pool.get_new_blocks(1)
        shared = blocks[index]
        blocks[index] = copy
        ids = list(self._block_ids[req_id])  # a new list: readers may cache what they saw of the old one
        ids[index] = copy.block_id
        self._block_ids[req_id] = ids
        self.block_pool.free_blocks([shared])
        return shared.block_id, copy.block_id

    def has_blocks(self, req_id: str) -> bool:
        """Whether ``req_id`` owns a block table (possibly empty)."""
        return req_id in self._blocks

    def get_block_table(self, req_id: str) -> list[int]:
        """Block ids of ``req_id`` in sequence order (a copy).

        Raises:
            KeyError: ``req_id`` owns no block table.
        """
        return list(self._block_ids[req_id])

    def block_table_view(self, req_id: str) -> list[int]:
        """Block ids of ``req_id`` in sequence order: the manager's own list, which
        only grows (appends) while the request runs; a copy-on-write replaces
        it with a new list. Read it, never modify it (a copy would cost a
        Python list per request per step).

        Raises:
            KeyError: ``req_id`` owns no block table.
        """
        return self._block_ids[req_id]

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
