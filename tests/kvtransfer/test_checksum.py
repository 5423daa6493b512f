"""Per-block CRC-32 over a block's bytes in every carried layer."""

from __future__ import annotations

import zlib

import pytest
import torch

from kvtransfer.blocks import to_cpu_bytes
from kvtransfer.checksum import CHECKSUM_ALGORITHM, block_checksums, tensor_block_checksums


def test_algorithm_is_standard_crc32() -> None:
    assert CHECKSUM_ALGORITHM == "crc32"
    assert block_checksums(b"123456789", num_rows=1, num_blocks=1) == [0xCBF43926]  # the CRC-32 check value


def test_a_block_covers_its_slice_of_every_row_in_order() -> None:
    # rows x blocks x 3 bytes: row 0 = "abc" "def", row 1 = "ghi" "jkl".
    assert block_checksums(b"abcdefghijkl", num_rows=2, num_blocks=2) == [
        zlib.crc32(b"abcghi"),
        zlib.crc32(b"defjkl"),
    ]


def test_bad_split_is_refused() -> None:
    with pytest.raises(ValueError, match="payload of 10 bytes cannot be split into 2 x 2 blocks"):
        block_checksums(b"0123456789", num_rows=2, num_blocks=2)


def test_bfloat16_tensor_checksums_change_only_for_the_touched_block() -> None:
    data = torch.arange(2 * 2 * 3 * 4, dtype=torch.float32).reshape(2, 2, 3, 4).to(torch.bfloat16)
    sums = tensor_block_checksums(data)
    raw = bytes(to_cpu_bytes(data))  # rows of 3 blocks x 8 bytes
    assert sums[2] == zlib.crc32(b"".join(raw[(row * 3 + 2) * 8 : (row * 3 + 3) * 8] for row in range(4)))
    data[1, 0, 1, 3] += 1
    changed = tensor_block_checksums(data)
    assert (changed[0], changed[2]) == (sums[0], sums[2])
    assert changed[1] != sums[1]
