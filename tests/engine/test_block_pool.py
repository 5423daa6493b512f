import pytest

from engine.block_pool import BlockPool, BlockPoolInvariantError
from engine.errors import CapacityExceeded


def ids(blocks):
    return [b.block_id for b in blocks]


def test_allocate_from_head_in_id_order():
    pool = BlockPool(num_blocks=8, block_size=4)
    assert ids(pool.get_new_blocks(3)) == [0, 1, 2]
    assert ids(pool.get_new_blocks(2)) == [3, 4]
    assert pool.num_free_blocks == 3
    assert pool.num_used_blocks == 5
    assert pool.free_queue.block_ids() == [5, 6, 7]


def test_free_appends_to_tail_in_given_order():
    pool = BlockPool(8, 4)
    a = pool.get_new_blocks(3)
    pool.free_blocks(reversed(a))
    assert pool.free_queue.block_ids() == [3, 4, 5, 6, 7, 2, 1, 0]
    assert ids(pool.get_new_blocks(6)) == [3, 4, 5, 6, 7, 2]
    assert all(b.ref_cnt == 1 for b in pool.blocks[2:8])


def test_capacity_exceeded_takes_nothing():
    pool = BlockPool(4, 2)
    pool.get_new_blocks(3)
    with pytest.raises(CapacityExceeded):
        pool.get_new_blocks(2)
    assert pool.num_free_blocks == 1


def test_double_free_raises_invariant_error():
    pool = BlockPool(4, 2)
    (block,) = pool.get_new_blocks(1)
    pool.free_blocks([block])
    with pytest.raises(BlockPoolInvariantError):
        pool.free_blocks([block])
    assert isinstance(BlockPoolInvariantError(), AssertionError)
    assert pool.num_free_blocks == 4


def test_touch_shares_and_removes_from_middle_of_queue():
    pool = BlockPool(6, 2)
    blocks = pool.get_new_blocks(3)
    pool.free_blocks(blocks)  # queue: 3 4 5 0 1 2
    pool.touch([blocks[1]])  # take block 1 back from the middle
    assert pool.free_queue.block_ids() == [3, 4, 5, 0, 2]
    pool.touch([blocks[1]])
    assert blocks[1].ref_cnt == 2
    pool.free_blocks([blocks[1]])
    assert blocks[1].ref_cnt == 1 and pool.num_free_blocks == 5
    pool.free_blocks([blocks[1]])
    assert pool.free_queue.block_ids() == [3, 4, 5, 0, 2, 1]


def test_prefix_cache_hit_and_eviction_on_reuse():
    pool = BlockPool(3, 2)
    a, b = pool.get_new_blocks(2)
    assert pool.cache_full_block(a, b"h-a")
    assert not pool.cache_full_block(b, b"h-a")  # first copy wins
    assert b.block_hash is None
    assert pool.get_cached_block(b"h-a") is a
    pool.free_blocks([b, a])  # queue: 2 1 0; block 0 stays cached while free
    assert pool.get_cached_block(b"h-a") is a
    pool.touch([a])
    assert a.ref_cnt == 1 and pool.free_queue.block_ids() == [2, 1]
    pool.free_blocks([a])  # queue: 2 1 0
    assert ids(pool.get_new_blocks(2)) == [2, 1]
    assert pool.get_cached_block(b"h-a") is a
    assert ids(pool.get_new_blocks(1)) == [0]  # reused: the hash is evicted
    assert pool.get_cached_block(b"h-a") is None
    assert a.block_hash is None and pool.num_cached_blocks == 0


def test_cache_requires_held_uncached_block():
    pool = BlockPool(2, 2)
    with pytest.raises(BlockPoolInvariantError):
        pool.cache_full_block(pool.blocks[0], b"h")  # free block
    (block,) = pool.get_new_blocks(1)
    pool.cache_full_block(block, b"h")
    with pytest.raises(BlockPoolInvariantError):
        pool.cache_full_block(block, b"h2")


def test_rejects_bad_sizes():
    with pytest.raises(ValueError):
        BlockPool(0, 4)
    with pytest.raises(ValueError):
        BlockPool(4, 0)
