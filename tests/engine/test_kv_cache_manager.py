import pytest

from engine.block_pool import BlockPool
from engine.errors import CapacityExceeded
from engine.kv_cache_manager import KVCacheManager


def make(num_blocks=8, block_size=4):
    return KVCacheManager(BlockPool(num_blocks, block_size))


def test_allocate_grows_block_table():
    kv = make()
    assert kv.allocate("a", 9) == [0, 1, 2]
    assert kv.allocate("b", 1) == [3]
    assert kv.allocate("a", 12) == []  # 12 tokens still fit in 3 blocks
    assert kv.allocate("a", 13) == [4]
    assert kv.get_block_table("a") == [0, 1, 2, 4]
    assert (kv.num_used_blocks, kv.num_free_blocks, kv.num_total_blocks) == (5, 3, 8)


def test_can_allocate_counts_held_blocks():
    kv = make(num_blocks=4)
    kv.allocate("a", 8)
    assert kv.can_allocate(16, "a")  # needs 2 more, 2 free
    assert not kv.can_allocate(17, "a")
    assert not kv.can_allocate(9)  # a new request needs 3
    assert kv.num_blocks_needed(16, "a") == 2
    assert kv.num_blocks_needed(4, "a") == 0


def test_allocate_failure_changes_nothing():
    kv = make(num_blocks=4)
    kv.allocate("a", 4)
    with pytest.raises(CapacityExceeded):
        kv.allocate("a", 20)
    assert kv.get_block_table("a") == [0]
    assert kv.num_free_blocks == 3


def test_free_reverse_order_and_reuse():
    kv = make(num_blocks=6)
    kv.allocate("a", 12)  # 0 1 2
    kv.allocate("b", 4)  # 3
    assert kv.free("a") == 3
    assert kv.block_pool.free_queue.block_ids() == [4, 5, 2, 1, 0]
    assert kv.free("a") == 0  # unknown: no-op
    assert not kv.has_blocks("a")
    assert kv.allocate("c", 12) == [4, 5, 2]
    with pytest.raises(KeyError):
        kv.get_block_table("a")


def test_slot_mapping():
    kv = make(block_size=4)
    kv.allocate("x", 4)  # block 0
    kv.allocate("a", 6)  # blocks 1, 2
    assert kv.slot_mapping("a", 0, 6) == [4, 5, 6, 7, 8, 9]
    assert kv.slot_mapping("a", 5, 1) == [9]
    assert kv.slot_mapping("a", 3, 0) == []
    with pytest.raises(ValueError):
        kv.slot_mapping("a", 6, 3)  # position 8 is past the table


def test_empty_allocation_registers_request():
    kv = make()
    assert kv.allocate("a", 0) == []
    assert kv.has_blocks("a") and kv.get_block_table("a") == []
