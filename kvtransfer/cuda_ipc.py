"""The ``cuda_ipc`` backend: the prefill worker writes straight into the decode worker's KV cache.

Same host, same or different GPUs. At the handshake (:mod:`kvtransfer.device`)
the decode worker exports its whole cache tensor once: the fields of torch's CUDA
storage sharing (``UntypedStorage._share_cuda_()``: a ``cudaIpcMemHandle``, the
storage's size and offset, the producer's reference counter and IPC event) travel
as a ``CudaIpcExport`` protobuf, never pickled. The prefill worker maps it once per
decode worker (``torch.multiprocessing.reductions.rebuild_cuda_tensor``, which
calls ``cudaIpcOpenMemHandle``), keeps the mapping for the connection's life, and
per granted message launches :func:`kernels.kv_copy.copy_blocks_triton` on a
transfer stream of its own device: source blocks → the reserved block ids, over
the message's layers, through the peer mapping. Per message the host work is small
and stays on the event loop: the source and destination ids go to the GPU in one
non-blocking copy from pinned memory and the kernel is launched. Only a ``last``
message (and a flush before an abandon or a dropped connection) records a CUDA
event after its copy and polls it (:func:`kvtransfer.device_events.wait_cuda_event`): the
stream runs in order, so every earlier layer group of the request is in place too
when ``KvWriteDone`` of the ``last`` one tells the decode worker to commit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from engine.errors import InvalidRequest, LayoutMismatch
from kvtransfer.base import _Reservation
from kvtransfer.device import ReceiverChannel, SenderChannel
from kvtransfer.device_events import wait_cuda_event
from kvtransfer.device_receiver import DeviceKvReceiver
from kvtransfer.device_sender import DeviceKvSender
from kvtransfer.layout import KvLayout
from tandem.v1 import kv_pb2

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


class CudaIpcKvSender(DeviceKvSender):
    """Asks decode workers for ``cuda_ipc`` (see the module docstring)."""

    name = "cuda_ipc"


class CudaIpcKvReceiver(DeviceKvReceiver):
    """Serves ``cuda_ipc`` only; the cache must be on CUDA when a peer connects."""

    name = "cuda_ipc"
    accepted: ClassVar[tuple[str, ...]] = ("cuda_ipc",)


class _IpcReceiverChannel(ReceiverChannel):
    """Nothing to receive: the peer writes the blocks and then says so."""

    async def receive(
        self, receiver: DeviceKvReceiver, res: _Reservation, header: kv_pb2.KvTransferHeader
    ) -> None:
        return None


def export_cache(kv_cache: torch.Tensor) -> kv_pb2.CudaIpcExport:
    """The ``CudaIpcExport`` of a CUDA tensor (contiguous, the whole cache).

    Raises:
        InvalidRequest: ``kv_cache`` is not on CUDA.
    """
    if kv_cache.device.type != "cuda":
        raise InvalidRequest("transport", f"cuda_ipc needs a CUDA KV cache, this one is on {kv_cache.device}")
    (
        device,
        handle,
        storage_size,
        storage_offset_bytes,
        ref_counter_handle,
        ref_counter_offset,
        event_handle,
        event_sync_required,
    ) = kv_cache.untyped_storage()._share_cuda_()
    return kv_pb2.CudaIpcExport(
        handle=handle,
        storage_size_bytes=storage_size,
        storage_offset_bytes=storage_offset_bytes,
        ref_counter_handle=ref_counter_handle,
        ref_counter_offset=ref_counter_offset,
        event_handle=event_handle or b"",
        event_sync_required=bool(event_sync_required),
        shape=list(kv_cache.shape),
        stride=list(kv_cache.stride()),
        storage_offset=int(kv_cache.storage_offset()),
        dtype=str(kv_cache.dtype).removeprefix("torch."),
        device_index=device,
    )


async def open_ipc_receiver(
    receiver: DeviceKvReceiver, hello: kv_pb2.KvHello, export: kv_pb2.KvExport
) -> ReceiverChannel:
    """Put the cache's IPC export (computed once per receiver) in ``export``."""
    state = receiver.backend_state.get("cuda_ipc")
    if state is None:
        state = receiver.backend_state["cuda_ipc"] = export_cache(receiver.kv_cache)
    assert isinstance(state, kv_pb2.CudaIpcExport)
    export.cuda_ipc.CopyFrom(state)
    return _IpcReceiverChannel()


def local_device_index(uuid: str, fallback: int) -> int:
    """This process's ordinal of the GPU with ``uuid`` (visible-device lists may differ per process)."""
    import torch

    for index in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(index).uuid) == uuid:
            return index
    return fallback


def map_export(export: kv_pb2.KvExport) -> torch.Tensor:
    """Open the peer's exported cache in this process (``cudaIpcOpenMemHandle``).

    Raises:
        LayoutMismatch: the mapped tensor's shape or dtype disagrees with the peer's layout.
    """
    import torch
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    ipc = export.cuda_ipc
    device = local_device_index(export.peer.device_uuid, ipc.device_index)
    dtype = getattr(torch, ipc.dtype)
    tensor = rebuild_cuda_tensor(
        torch.Tensor,
        torch.Size(ipc.shape),
        tuple(ipc.stride),
        ipc.storage_offset,
        torch.UntypedStorage,
        dtype,
        device,
        ipc.handle,
        ipc.storage_size_bytes,
        ipc.storage_offset_bytes,
        False,
        ipc.ref_counter_handle,
        ipc.ref_counter_offset,
        ipc.event_handle or None,
        ipc.event_sync_required,
    )
    KvLayout.from_pb(export.peer.layout).check_cache(tensor)
    if not tensor.is_contiguous():
        raise LayoutMismatch(f"exported KV cache is not contiguous (strides {list(ipc.stride)})")
    return tensor


class _IpcSenderChannel(SenderChannel):
    """Writes into the mapped peer cache with the block copy kernel on a transfer stream."""

    def __init__(self, remote: torch.Tensor, kv_cache: torch.Tensor) -> None:
        import torch

        self.remote = remote
        self.stream = torch.cuda.Stream(kv_cache.device)
        if remote.device != kv_cache.device:  # enable peer access src -> dst with a 1-element read
            kv_cache.new_empty(1).copy_(remote.view(-1)[:1])

    async def push(
        self, header: kv_pb2.KvTransferHeader, src_block_ids: Sequence[int], kv_cache: torch.Tensor
    ) -> None:
        self._launch(header, src_block_ids, kv_cache)
        if header.last:
            await self.flush()

    async def flush(self) -> None:
        import torch

        event = torch.cuda.Event()
        event.record(self.stream)
        await wait_cuda_event(event)

    def _launch(
        self, header: kv_pb2.KvTransferHeader, src_block_ids: Sequence[int], kv_cache: torch.Tensor
    ) -> None:
        """Enqueue the copy on the transfer stream (module docstring).

        Raises:
            InvalidRequest: a destination block id is outside the mapped cache.
        """
        import torch

        from kernels.kv_copy import copy_blocks_triton

        dst_ids = list(header.destination.block_ids)
        if not all(0 <= b < self.remote.shape[2] for b in dst_ids):
            raise InvalidRequest(
                "destination.block_ids", f"{dst_ids} are outside [0, {self.remote.shape[2]})"
            )
        n = len(dst_ids)
        ids = torch.tensor([*src_block_ids, *dst_ids], dtype=torch.int64).pin_memory()
        ls, le = header.layer_start, header.layer_end
        with torch.cuda.stream(self.stream):
            ids_dev = ids.to(kv_cache.device, non_blocking=True)  # the host buffer is kept until it ran
            copy_blocks_triton(
                kv_cache,
                ids_dev[:n],
                self.remote,
                ids_dev[n:],
                src_layer_start=ls,
                dst_layer_start=ls,
                n_layers=le - ls,
            )

    async def close(self) -> None:
        del self.remote


async def open_ipc_sender(export: kv_pb2.KvExport, kv_cache: torch.Tensor) -> SenderChannel:
    """Map the exported cache (once per decode worker connection).

    Raises:
        InvalidRequest: this worker's cache is not on CUDA.
        LayoutMismatch: the mapped cache disagrees with the peer's layout.
    """
    if kv_cache.device.type != "cuda":
        raise InvalidRequest("transport", f"cuda_ipc needs a CUDA KV cache, this one is on {kv_cache.device}")
    remote = await asyncio.to_thread(map_export, export)
    logger.info(
        "mapped the KV cache of %s over CUDA IPC: %s %s on cuda:%d",
        export.peer.worker_id,
        list(remote.shape),
        remote.dtype,
        remote.device.index,
    )
    return _IpcSenderChannel(remote, kv_cache)
