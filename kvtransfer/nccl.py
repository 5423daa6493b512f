"""The ``nccl`` backend: torch.distributed point-to-point between a prefill and a decode worker.

Across hosts (or wherever CUDA IPC cannot reach). One two-rank process group per
(prefill worker, decode worker) pair, created at the handshake
(:mod:`kvtransfer.device`) and reused by every message: the decode worker hosts
one ``TCPStore`` for all its peers (each pair's rendezvous uses a client of its own,
so a peer that never joins holds up only its own pair); its ``KvExport`` carries
the store's address, a key prefix unique to the connection, the torch.distributed
backend and its staging size (``NcclRendezvous``). Both sides then build the group on the
prefixed store (sender rank 0, receiver rank 1) and exchange one warm-up
element, so the communicator exists before the first request.

Per granted message the blocks are moved in chunks of whole blocks that fit the
staging buffer: the sender gathers a chunk into its contiguous staging buffer
(:func:`kernels.kv_copy.copy_blocks`), sends it as one ``uint8`` message; the
receiver receives it into its staging buffer and, if the reservation is still
live, scatters it into the reserved blocks. Each side allocates one staging
buffer per peer (:attr:`STAGING_BYTES`, on the cache's device).

The torch.distributed backend follows the cache's device: ``nccl`` for CUDA,
``gloo`` for CPU (so CPU tests run this same code between real processes over
127.0.0.1); :attr:`NcclKvReceiver.dist_backend` overrides it. Memory: each pair's
staging buffer and, on CUDA, the communicator's device memory (measured as the
drop of free device memory across the group's creation and warm-up) are logged
and kept in ``memory`` (bytes) of the sender and receiver.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from engine.errors import InvalidRequest, TransferFailed
from kvtransfer.base import _Reservation
from kvtransfer.device import ReceiverChannel, SenderChannel
from kvtransfer.device_receiver import DeviceKvReceiver
from kvtransfer.device_sender import DeviceKvSender
from kvtransfer.layout import KvLayout
from tandem.v1 import kv_pb2

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Bytes of each side's staging buffer per peer.
STAGING_BYTES = 64 << 20
#: Seconds a point-to-point operation may wait for its peer.
P2P_TIMEOUT_S = 60.0
SENDER_RANK, RECEIVER_RANK = 0, 1


class NcclKvSender(DeviceKvSender):
    """Asks decode workers for ``nccl`` (see the module docstring)."""

    name = "nccl"


class NcclKvReceiver(DeviceKvReceiver):
    """Serves ``nccl`` only."""

    name = "nccl"
    accepted: ClassVar[tuple[str, ...]] = ("nccl",)


def default_backend(kv_cache: torch.Tensor) -> str:
    """``"nccl"`` for a CUDA cache, ``"gloo"`` for a CPU one."""
    return "nccl" if kv_cache.device.type == "cuda" else "gloo"


def chunk_blocks(layout: KvLayout, num_layers: int, staging_bytes: int) -> int:
    """Whole blocks (of ``num_layers`` layers) per chunk: as many as fit ``staging_bytes``, at least 1."""
    return max(1, staging_bytes // (num_layers * layout.bytes_per_block_layer))


def make_group(backend: str, store: Any, rank: int, device: torch.device, local_host: str) -> tuple[Any, int]:
    """Build a two-rank process group on ``store`` and warm it up; returns it and the device bytes it took.

    Blocks until the peer joins (call it off the event loop). ``gloo`` binds to
    ``local_host`` (the address the control connection uses).
    """
    import torch
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=P2P_TIMEOUT_S)
    free_before = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    group: Any
    if backend == "gloo":
        options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=local_host)]
        options._timeout = timeout
        group = dist.ProcessGroupGloo(store, rank, 2, options)
    elif backend == "nccl":
        nccl_options = dist.ProcessGroupNCCL.Options()
        nccl_options._timeout = timeout
        group = dist.ProcessGroupNCCL(store, rank, 2, nccl_options)
    else:
        raise InvalidRequest("nccl.backend", f"{backend!r} is not 'nccl' or 'gloo'")
    probe = torch.zeros(1, dtype=torch.uint8, device=device)
    work = group.send([probe], 1 - rank, 0) if rank == SENDER_RANK else group.recv([probe], 1 - rank, 0)
    work.wait()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return group, max(0, free_before - torch.cuda.mem_get_info(device)[0])
    return group, 0


class _Staging:
    """A flat ``uint8`` buffer on the cache's device, viewed as a gathered chunk."""

    def __init__(self, num_bytes: int, device: torch.device) -> None:
        import torch

        self.buffer = torch.empty(num_bytes, dtype=torch.uint8, device=device)

    def view(
        self, layout: KvLayout, dtype: torch.dtype, num_layers: int, num_blocks: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(bytes, tensor)``: the first bytes of the buffer and them as ``[num_layers, 2, num_blocks, B, H, D]``."""
        import torch

        nbytes = layout.payload_bytes(num_blocks, 0, num_layers)
        raw = (
            self.buffer[:nbytes]
            if nbytes <= self.buffer.numel()
            else torch.empty(nbytes, dtype=torch.uint8, device=self.buffer.device)
        )
        shape = (num_layers, 2, num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
        return raw, raw.view(dtype).view(shape)


def _recv(group: Any, raw: torch.Tensor) -> None:
    """Receive one chunk from the sender into ``raw`` (blocks until it arrived or timed out)."""
    group.recv([raw], SENDER_RANK, 0).wait()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.current_stream(device).synchronize()


class _NcclReceiverChannel(ReceiverChannel):
    def __init__(self, group_future: asyncio.Future[tuple[Any, int]], staging_bytes: int) -> None:
        self.group_future = group_future
        self.staging_bytes = staging_bytes
        self.staging: _Staging | None = None

    async def receive(
        self, receiver: DeviceKvReceiver, res: _Reservation, header: kv_pb2.KvTransferHeader
    ) -> None:
        from kernels.kv_copy import copy_blocks

        group, _ = await self.group_future
        cache, layout = receiver.kv_cache, receiver.layout
        if self.staging is None:
            self.staging = _Staging(self.staging_bytes, cache.device)
        ls, le = header.layer_start, header.layer_end
        dst_ids = [res.block_ids[i] for i in header.block_indices]
        step = chunk_blocks(layout, le - ls, self.staging_bytes)
        for start in range(0, len(dst_ids), step):
            ids = dst_ids[start : start + step]
            raw, chunk = self.staging.view(layout, cache.dtype, le - ls, len(ids))
            try:
                await asyncio.to_thread(_recv, group, raw)
            except RuntimeError as exc:
                raise TransferFailed(f"KV receive from the peer failed: {exc}") from exc
            if not receiver.writable(res):
                continue  # released meanwhile: drain the rest, write nothing
            copy_blocks(chunk, range(len(ids)), cache, ids, dst_layer_start=ls)
            await asyncio.to_thread(_sync, cache.device)

    async def close(self) -> None:
        if self.group_future.done():
            _shutdown(self.group_future)
        else:  # once a late sender joined (or the rendezvous timed out)
            self.group_future.add_done_callback(_shutdown)


def _shutdown(future: asyncio.Future[tuple[Any, int]]) -> None:
    """Shut a pair's group down once it exists (a failed rendezvous has nothing to shut)."""
    if future.cancelled() or future.exception() is not None:
        return
    group, _ = future.result()
    if hasattr(group, "shutdown"):
        group.shutdown()


async def open_nccl_receiver(
    receiver: DeviceKvReceiver, hello: kv_pb2.KvHello, export: kv_pb2.KvExport
) -> ReceiverChannel:
    """Start the pair's group (it completes when the sender joins) and put the rendezvous in ``export``."""
    import torch.distributed as dist

    store = receiver.backend_state.get("nccl")
    if store is None:
        store = dist.TCPStore(
            receiver.host, 0, None, True, datetime.timedelta(seconds=P2P_TIMEOUT_S), wait_for_workers=False
        )
        receiver.backend_state["nccl"] = store
    assert isinstance(store, dist.TCPStore)
    cache = receiver.kv_cache
    backend = receiver.dist_backend or default_backend(cache)
    prefix = f"{hello.peer.worker_id}/{uuid.uuid4().hex}"
    export.nccl.CopyFrom(
        kv_pb2.NcclRendezvous(
            store_host=receiver.host,
            store_port=store.port,
            prefix=prefix,
            backend=backend,
            staging_bytes=STAGING_BYTES,
            sender_rank=SENDER_RANK,
            receiver_rank=RECEIVER_RANK,
        )
    )
    port = store.port

    def join() -> tuple[Any, int]:
        # A store client per pair: a client's blocking wait holds its socket, so one client shared
        # by all pairs let a sender that never joined stall every later rendezvous for P2P_TIMEOUT_S.
        client = dist.TCPStore(receiver.host, port, None, False, datetime.timedelta(seconds=P2P_TIMEOUT_S))
        pair_store = dist.PrefixStore(prefix, client)
        return make_group(backend, pair_store, RECEIVER_RANK, cache.device, receiver.host)

    group_future = _in_daemon_thread(join)
    group_future.add_done_callback(
        lambda f: _account(receiver.memory, hello.peer.worker_id, f, STAGING_BYTES, cache)
    )
    return _NcclReceiverChannel(group_future, STAGING_BYTES)


def _in_daemon_thread(fn: Callable[[], _T]) -> asyncio.Future[_T]:
    """``fn()`` in a thread of its own: a rendezvous whose peer never joins blocks for
    :data:`P2P_TIMEOUT_S`, which must hold neither the event loop's shared executor nor its
    shutdown."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def settle(result: _T | None, exc: BaseException | None) -> None:
        if future.cancelled():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result, exc = fn(), None
        except BaseException as error:
            result, exc = None, error
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
            loop.call_soon_threadsafe(settle, result, exc)

    threading.Thread(target=run, name="kv-nccl-rendezvous", daemon=True).start()
    return future


def _account(
    memory: dict[str, int],
    peer: str,
    future: asyncio.Future[tuple[Any, int]],
    staging: int,
    cache: torch.Tensor,
) -> None:
    """Record and log a pair's device memory once its group is up."""
    if future.cancelled() or future.exception() is not None:
        return
    comm_bytes = future.result()[1]
    staging_bytes = staging if cache.device.type == "cuda" else 0
    memory[f"{peer}/communicator"] = comm_bytes
    memory[f"{peer}/staging"] = staging_bytes
    logger.info(
        "nccl pair with %s: communicator %.1f MiB, staging %.1f MiB of device memory",
        peer,
        comm_bytes / 2**20,
        staging_bytes / 2**20,
    )


class _NcclSenderChannel(SenderChannel):
    def __init__(self, group: Any, staging_bytes: int, layout: KvLayout, kv_cache: torch.Tensor) -> None:
        self.group = group
        self.staging_bytes = staging_bytes
        self.layout = layout
        self.staging = _Staging(staging_bytes, kv_cache.device)

    async def push(
        self, header: kv_pb2.KvTransferHeader, src_block_ids: Sequence[int], kv_cache: torch.Tensor
    ) -> None:
        await asyncio.to_thread(self._send, header, list(src_block_ids), kv_cache)

    def _send(
        self, header: kv_pb2.KvTransferHeader, src_block_ids: list[int], kv_cache: torch.Tensor
    ) -> None:
        from kernels.kv_copy import copy_blocks

        ls, le = header.layer_start, header.layer_end
        step = chunk_blocks(self.layout, le - ls, self.staging_bytes)
        for start in range(0, len(src_block_ids), step):
            ids = src_block_ids[start : start + step]
            raw, chunk = self.staging.view(self.layout, kv_cache.dtype, le - ls, len(ids))
            copy_blocks(kv_cache, ids, chunk, range(len(ids)), src_layer_start=ls, n_layers=le - ls)
            self.group.send([raw], RECEIVER_RANK, 0).wait()
        _sync(kv_cache.device)

    async def close(self) -> None:
        if hasattr(self.group, "shutdown"):
            self.group.shutdown()


async def open_nccl_sender(
    sender: DeviceKvSender, export: kv_pb2.KvExport, kv_cache: torch.Tensor, local_host: str
) -> SenderChannel:
    """Join the pair's group through the receiver's store (blocking work off the event loop)."""
    import torch.distributed as dist

    rdv = export.nccl
    expected = default_backend(kv_cache)
    if rdv.backend not in (expected, "gloo"):
        raise InvalidRequest(
            "nccl.backend", f"receiver wants {rdv.backend!r}, this {kv_cache.device} cache needs {expected!r}"
        )

    def join() -> tuple[Any, int]:
        store = dist.TCPStore(
            rdv.store_host, rdv.store_port, None, False, datetime.timedelta(seconds=P2P_TIMEOUT_S)
        )
        return make_group(
            rdv.backend, dist.PrefixStore(rdv.prefix, store), SENDER_RANK, kv_cache.device, local_host
        )

    try:
        group, comm_bytes = await asyncio.to_thread(join)
    except RuntimeError as exc:
        raise TransferFailed(
            f"cannot join the {rdv.backend} group of {export.peer.worker_id}: {exc}"
        ) from exc
    staging = int(rdv.staging_bytes)
    future: asyncio.Future[tuple[Any, int]] = asyncio.get_running_loop().create_future()
    future.set_result((group, comm_bytes))
    _account(sender.memory, export.peer.worker_id, future, staging, kv_cache)
    return _NcclSenderChannel(group, staging, sender.layout, kv_cache)
