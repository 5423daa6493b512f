"""KvLayout and KvDestination: wire round trips, sizes, compatibility checks."""

from __future__ import annotations

import pytest
import torch

from engine.errors import LayoutMismatch
from kvtransfer.layout import PROTOCOL_VERSION, KvDestination, KvLayout
from tandem.v1 import kv_pb2
from tests.kvtransfer import make_layout


def test_layout_round_trips_through_its_wire_form() -> None:
    layout = make_layout("bfloat16", tensor_parallel_size=2)
    pb = layout.to_pb()
    assert pb == kv_pb2.LayoutDescriptor(
        protocol_version=PROTOCOL_VERSION,
        model_id="tiny",
        dtype="bfloat16",
        num_layers=3,
        num_kv_heads=2,
        head_dim=4,
        block_size=4,
        cache_layout="LKBTHD",
        tensor_parallel_size=2,
    )
    assert KvLayout.from_pb(pb) == layout


def test_sizes_in_bytes() -> None:
    # 2 (K, V) * 4 tokens * 2 heads * 4 dims * element size, times 3 layers.
    assert make_layout("float32").bytes_per_block_layer == 256
    assert make_layout("float32").bytes_per_block == 768
    assert make_layout("bfloat16").bytes_per_block == 384
    assert make_layout("float16").payload_bytes(num_blocks=5, layer_start=1, layer_end=3) == 5 * 2 * 128


def test_unknown_dtype_has_no_size() -> None:
    with pytest.raises(ValueError, match="unsupported KV cache dtype 'int8'"):
        _ = make_layout("int8").bytes_per_block


def test_check_compatible_names_every_differing_field_on_both_sides() -> None:
    ours = make_layout()
    ours.check_compatible(make_layout())
    theirs = make_layout("bfloat16", num_layers=4, protocol_version=2)
    with pytest.raises(LayoutMismatch) as info:
        ours.check_compatible(theirs)
    assert str(info.value) == (
        "KV layout mismatch: protocol_version: ours=1 theirs=2; dtype: ours='float32' theirs='bfloat16'; "
        "num_layers: ours=3 theirs=4"
    )
    assert info.value.grpc_code == "FAILED_PRECONDITION"


def test_for_cache_reads_the_layout_of_a_tensor() -> None:
    cache = torch.zeros(3, 2, 10, 4, 2, 4, dtype=torch.bfloat16)
    layout = KvLayout.for_cache(cache, "tiny")
    assert layout == make_layout("bfloat16")
    layout.check_cache(cache)
    with pytest.raises(ValueError, match=r"got \[3, 10, 4, 2, 4\]"):
        KvLayout.for_cache(cache[:, 0], "tiny")
    with pytest.raises(ValueError, match="unsupported KV cache dtype 'int32'"):
        KvLayout.for_cache(cache.to(torch.int32), "tiny")


def test_check_cache_refuses_a_tensor_of_another_layout() -> None:
    with pytest.raises(LayoutMismatch, match=r"kv_cache \[3, 2, 10, 8, 2, 4\] bfloat16 does not match"):
        make_layout("bfloat16").check_cache(torch.zeros(3, 2, 10, 8, 2, 4, dtype=torch.bfloat16))
    with pytest.raises(LayoutMismatch, match=r"float32 does not match layout: expected .* bfloat16"):
        make_layout("bfloat16").check_cache(torch.zeros(3, 2, 10, 4, 2, 4))


def test_destination_round_trips_through_its_wire_form() -> None:
    dest = KvDestination(
        worker_id="decode-0",
        epoch=3,
        reservation_id="res-9",
        block_ids=(4, 0, 2),
        transport="tcp",
        transfer_address="127.0.0.1:7001",
        layout=make_layout(),
        lease_expires_unix_ms=1_700_000_000_123,
    )
    pb = dest.to_pb()
    assert list(pb.block_ids) == [4, 0, 2]
    assert pb.layout.model_id == "tiny"
    assert KvDestination.from_pb(kv_pb2.KvDestination.FromString(pb.SerializeToString())) == dest
