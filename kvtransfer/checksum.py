"""Per-block checksums of a transfer payload (torch-free at import).

Algorithm ``"crc32"``: CRC-32 as computed by :func:`zlib.crc32` (the ISO-HDLC /
IEEE 802.3 polynomial 0x04C11DB7, reflected, init and final XOR 0xFFFFFFFF; the
same CRC as gzip and PNG). A block's checksum runs over the block's bytes in every
carried layer, K then V, in layer order: for a payload tensor ``[n_layers, 2,
n_blocks, ...]`` the checksum of block ``i`` is the CRC of the concatenation of
rows ``payload[l, kv, i]`` over ``(l, kv)`` in row-major order. It is computed on
the raw little-endian bytes, never on pickled objects.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: Value of ``KvTransferHeader.checksum_algorithm`` for :func:`block_checksums`.
CHECKSUM_ALGORITHM = "crc32"


def block_checksums(payload: memoryview | bytes | bytearray, num_rows: int, num_blocks: int) -> list[int]:
    """CRC-32 of each block of a payload laid out ``[num_rows, num_blocks, block_bytes]``.

    Args:
        payload: raw bytes; ``num_rows`` is ``2 * n_layers`` (layer-major, K then V).
        num_rows: rows of the payload.
        num_blocks: blocks per row.

    Returns:
        ``num_blocks`` unsigned 32-bit checksums, in block order.

    Raises:
        ValueError: the payload size is not a multiple of ``num_rows * num_blocks``.
    """
    view = memoryview(payload).cast("B")
    if num_rows <= 0 or num_blocks <= 0 or len(view) % (num_rows * num_blocks):
        raise ValueError(
            f"payload of {len(view)} bytes cannot be split into {num_rows} x {num_blocks} blocks"
        )
    block_bytes = len(view) // (num_rows * num_blocks)
    sums = []
    for block in range(num_blocks):
        crc = 0
        for row in range(num_rows):
            start = (row * num_blocks + block) * block_bytes
            crc = zlib.crc32(view[start : start + block_bytes], crc)
        sums.append(crc)
    return sums


def tensor_block_checksums(data: torch.Tensor) -> list[int]:
    """:func:`block_checksums` of a gathered tensor ``[n_layers, 2, n_blocks, block_size, H, D]`` (any dtype/device)."""
    from kvtransfer.blocks import to_cpu_bytes

    return block_checksums(to_cpu_bytes(data), data.shape[0] * data.shape[1], data.shape[2])
