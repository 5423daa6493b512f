"""The ``loopback`` backend: an in-process fake twin of ``tcp`` for unit tests of services.

A :class:`LoopbackKvReceiver` registers itself under an address ``"loopback:N"``
in a process-wide table when started; a :class:`LoopbackKvSender` looks the
address up and hands the message (header round-tripped through its serialized
form, payload bytes) straight to that receiver, which applies exactly the checks
of every backend (:class:`kvtransfer.base.KvReceiver`) before writing into its
cache. No sockets, no threads of its own.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from engine.errors import InvalidRequest, TransferFailed
from kvtransfer import framing
from kvtransfer.base import KvReceiver, KvSender, TransferStats
from kvtransfer.layout import KvDestination
from tandem.v1 import kv_pb2

if TYPE_CHECKING:
    import torch

#: Started loopback receivers by address.
_RECEIVERS: dict[str, LoopbackKvReceiver] = {}
_NEXT_ID = itertools.count(1)


class LoopbackKvSender(KvSender):
    """:class:`KvSender` that delivers to a :class:`LoopbackKvReceiver` of the same process."""

    name = "loopback"

    async def send(
        self,
        request_id: str,
        destination: KvDestination,
        src_block_ids: Sequence[int],
        kv_cache: torch.Tensor,
        *,
        layer_start: int = 0,
        layer_end: int | None = None,
        last: bool = True,
    ) -> TransferStats:
        """See :meth:`KvSender.send`; TransferFailed when no receiver is started at the address."""
        started = time.perf_counter()
        header, payload = await self._encode(
            request_id, destination, src_block_ids, kv_cache, layer_start, layer_end, last
        )
        receiver = _RECEIVERS.get(destination.transfer_address)
        if receiver is None:
            raise TransferFailed(f"no loopback KV receiver at {destination.transfer_address!r}")
        ack = await receiver.deliver(header.SerializeToString(), payload)
        if not ack.ok:
            raise framing.error_from_ack(ack)
        return TransferStats(len(payload), len(src_block_ids), time.perf_counter() - started)

    async def close(self) -> None:
        """Nothing to release."""


class LoopbackKvReceiver(KvReceiver):
    """:class:`KvReceiver` reachable in-process at ``"loopback:N"`` (``host``/``port`` are ignored)."""

    name = "loopback"

    address: str | None = None

    async def start(self) -> str:
        """Register in the process-wide table; returns ``"loopback:N"``."""
        if self.address is None:
            self.address = f"loopback:{next(_NEXT_ID)}"
            _RECEIVERS[self.address] = self
        return self.address

    async def close(self) -> None:
        """Unregister and fail pending waits."""
        self._fail_all("KV receiver closed")
        if self.address is not None:
            _RECEIVERS.pop(self.address, None)
            self.address = None

    async def deliver(self, header_bytes: bytes, payload: memoryview | bytearray) -> kv_pb2.KvTransferAck:
        """Apply one message as the tcp receiver would: admit the header, verify, then write."""
        header = kv_pb2.KvTransferHeader.FromString(header_bytes)
        if header.payload_bytes != len(payload):
            detail = f"header says {header.payload_bytes} bytes, {len(payload)} came"
            return framing.ack_refused(InvalidRequest("payload_bytes", detail))
        admitted = self._admit(header)
        if isinstance(admitted, kv_pb2.KvTransferAck):
            return admitted
        return await self._commit(admitted, header, payload)
