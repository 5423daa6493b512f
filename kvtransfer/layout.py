"""The KV cache layout descriptor both sides of a transfer agree on, and the destination that carries it.

Domain forms of ``tandem.v1.LayoutDescriptor`` and ``tandem.v1.KvDestination``
(torch-free at import).

A :class:`KvLayout` says what the bytes of one KV block mean. The decode worker
advertises its layout in every ``KvDestination``; the prefill worker puts its own in
every ``KvTransferHeader``; the receiver compares the two field by field and refuses
any difference with :class:`engine.errors.LayoutMismatch`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.errors import LayoutMismatch
from tandem.v1 import kv_pb2

if TYPE_CHECKING:
    import torch

#: Version of the KV transfer protocol; bump on any wire or layout change.
PROTOCOL_VERSION = 1

#: ``[layer, k/v, block, token, head, dim]``: the only cache layout so far.
CACHE_LAYOUT_LKBTHD = "LKBTHD"

#: Element size in bytes of each supported cache dtype.
DTYPE_SIZES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True, kw_only=True)
class KvLayout:
    """Shape and meaning of a worker's KV cache, minus its number of blocks.

    Attributes:
        protocol_version: KV transfer protocol version (:data:`PROTOCOL_VERSION`).
        model_id: identity of the model weights (name plus a digest of its config).
        dtype: element dtype name: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        num_layers: transformer layers.
        num_kv_heads: key/value heads per layer (per tensor-parallel rank).
        head_dim: size of one head.
        block_size: tokens per block.
        cache_layout: memory layout name; ``"LKBTHD"`` = the cache tensor is
            ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``.
        tensor_parallel_size: ranks the heads are split over (1 for now).
    """

    protocol_version: int = PROTOCOL_VERSION
    model_id: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    cache_layout: str = CACHE_LAYOUT_LKBTHD
    tensor_parallel_size: int = 1

    @property
    def element_size(self) -> int:
        """Bytes per element of :attr:`dtype`.

        Raises:
            ValueError: the dtype is not one of :data:`DTYPE_SIZES`.
        """
        try:
            return DTYPE_SIZES[self.dtype]
        except KeyError:
            raise ValueError(
                f"unsupported KV cache dtype {self.dtype!r}; expected one of {sorted(DTYPE_SIZES)}"
            ) from None

    @property
    def bytes_per_block_layer(self) -> int:
        """Bytes of one block in one layer, K and V: ``2 * block_size * num_kv_heads * head_dim * element_size``."""
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * self.element_size

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block over all layers, K and V."""
        return self.num_layers * self.bytes_per_block_layer

    def payload_bytes(self, num_blocks: int, layer_start: int, layer_end: int) -> int:
        """Bytes of ``num_blocks`` blocks restricted to layers ``[layer_start, layer_end)``."""
        return num_blocks * (layer_end - layer_start) * self.bytes_per_block_layer

    def differences(self, other: KvLayout) -> list[str]:
        """``"field: ours=... theirs=..."`` for every field where ``other`` differs from ``self``."""
        lines = []
        for field in dataclasses.fields(self):
            ours, theirs = getattr(self, field.name), getattr(other, field.name)
            if ours != theirs:
                lines.append(f"{field.name}: ours={ours!r} theirs={theirs!r}")
        return lines

    def check_compatible(self, other: KvLayout) -> None:
        """Check that ``other`` (the peer's layout) describes the same bytes as ``self``.

        Raises:
            LayoutMismatch: listing every differing field as ``field: ours=... theirs=...``.
        """
        diffs = self.differences(other)
        if diffs:
            raise LayoutMismatch("KV layout mismatch: " + "; ".join(diffs))

    def check_cache(self, kv_cache: torch.Tensor) -> None:
        """Check that ``kv_cache`` is a tensor of this layout (any number of blocks).

        Raises:
            LayoutMismatch: wrong rank, dims or dtype.
        """
        shape = tuple(kv_cache.shape)
        dtype = _dtype_name(kv_cache)
        expected = (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)
        if len(shape) != 6 or (shape[:2] + shape[3:]) != expected or dtype != self.dtype:
            raise LayoutMismatch(
                f"kv_cache {list(shape)} {dtype} does not match layout: expected "
                f"[{self.num_layers}, 2, num_blocks, {self.block_size}, {self.num_kv_heads}, "
                f"{self.head_dim}] {self.dtype}"
            )

    @classmethod
    def for_cache(cls, kv_cache: torch.Tensor, model_id: str, *, tensor_parallel_size: int = 1) -> KvLayout:
        """The layout of ``kv_cache``: ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``.

        Raises:
            ValueError: ``kv_cache`` is not 6-D with a K/V dim of 2, or has an unsupported dtype.
        """
        if kv_cache.dim() != 6 or kv_cache.shape[1] != 2:
            raise ValueError(
                f"kv_cache must be [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim], "
                f"got {list(kv_cache.shape)}"
            )
        dtype = _dtype_name(kv_cache)
        if dtype not in DTYPE_SIZES:
            raise ValueError(f"unsupported KV cache dtype {dtype!r}; expected one of {sorted(DTYPE_SIZES)}")
        num_layers, _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
        return cls(
            model_id=model_id,
            dtype=dtype,
            num_layers=num_layers,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            block_size=block_size,
            tensor_parallel_size=tensor_parallel_size,
        )

    def to_pb(self) -> kv_pb2.LayoutDescriptor:
        """The wire form (``tandem.v1.LayoutDescriptor``)."""
        return kv_pb2.LayoutDescriptor(**dataclasses.asdict(self))

    @classmethod
    def from_pb(cls, pb: kv_pb2.LayoutDescriptor) -> KvLayout:
        """Inverse of :meth:`to_pb`; no validation (a peer's odd values show up in :meth:`check_compatible`)."""
        return cls(**{field.name: getattr(pb, field.name) for field in dataclasses.fields(cls)})


@dataclass(frozen=True)
class KvDestination:
    """Where a request's KV must go: blocks a decode worker reserved (domain form of ``KvDestination``).

    Attributes:
        worker_id: decode worker holding the reservation.
        epoch: that worker's incarnation.
        reservation_id: id of the reservation (unique per worker incarnation).
        block_ids: reserved block ids, one per prompt block, in prompt order.
        transport: backend name, e.g. ``"tcp"``.
        transfer_address: backend address, e.g. ``"127.0.0.1:7001"``.
        layout: the decode worker's cache layout.
        lease_expires_unix_ms: wall-clock ms after which unclaimed blocks go back.
    """

    worker_id: str
    epoch: int
    reservation_id: str
    block_ids: tuple[int, ...]
    transport: str
    transfer_address: str
    layout: KvLayout
    lease_expires_unix_ms: int = 0

    def to_pb(self) -> kv_pb2.KvDestination:
        """The wire form."""
        return kv_pb2.KvDestination(
            worker_id=self.worker_id,
            epoch=self.epoch,
            reservation_id=self.reservation_id,
            block_ids=self.block_ids,
            transport=self.transport,
            transfer_address=self.transfer_address,
            layout=self.layout.to_pb(),
            lease_expires_unix_ms=self.lease_expires_unix_ms,
        )

    @classmethod
    def from_pb(cls, pb: kv_pb2.KvDestination) -> KvDestination:
        """Inverse of :meth:`to_pb`."""
        return cls(
            worker_id=pb.worker_id,
            epoch=pb.epoch,
            reservation_id=pb.reservation_id,
            block_ids=tuple(pb.block_ids),
            transport=pb.transport,
            transfer_address=pb.transfer_address,
            layout=KvLayout.from_pb(pb.layout),
            lease_expires_unix_ms=pb.lease_expires_unix_ms,
        )


def _dtype_name(kv_cache: torch.Tensor) -> str:
    """``torch.bfloat16`` → ``"bfloat16"``."""
    return str(kv_cache.dtype).removeprefix("torch.")
