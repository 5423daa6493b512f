"""The ``auto`` sender: follows each destination's transport.

Destinations served over ``tcp`` (decode workers on CPU) go through a
:class:`kvtransfer.tcp.TcpKvSender`; every other one through the device control
channel, asking for the destination's transport (``"auto"`` lets the decode worker
choose ``cuda_ipc`` or ``nccl`` from the exchanged host ids and devices).
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvtransfer.base import TransferStats
from kvtransfer.device_sender import DeviceKvSender
from kvtransfer.layout import KvDestination, KvLayout
from kvtransfer.tcp import TcpKvSender

if TYPE_CHECKING:
    import torch


class AutoKvSender(DeviceKvSender):
    """:class:`KvSender` for ``--kv-transport auto`` (see the module docstring).

    Args:
        layout: this worker's cache layout.
        worker_id: sent as ``src_worker_id``.
        ssl_context: TLS for ``tcp`` destinations (:func:`kvtransfer.tcp.client_ssl_context`);
            ``None``: plaintext. The device control channel carries no KV bytes and stays plain.
    """

    name = "auto"

    def __init__(
        self, layout: KvLayout, worker_id: str, *, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        super().__init__(layout, worker_id)
        self._tcp = TcpKvSender(layout, worker_id, ssl_context=ssl_context)

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
        """See :meth:`KvSender.send`; ``tcp`` destinations go over tcp, others device to device."""
        send = self._tcp.send if destination.transport == "tcp" else super().send
        return await send(
            request_id,
            destination,
            src_block_ids,
            kv_cache,
            layer_start=layer_start,
            layer_end=layer_end,
            last=last,
        )

    def _asked(self, destination: KvDestination) -> str:
        """The destination's transport (``auto``, ``cuda_ipc`` or ``nccl``)."""
        return destination.transport

    async def close(self) -> None:
        """Close the tcp and device connections."""
        await self._tcp.close()
        await super().close()
