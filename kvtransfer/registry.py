"""Registry of KV transfer backends by name (``KvDestination.transport``, ``WorkerConfig.kv_transport``).

``tcp`` (CPU, any host), ``cuda_ipc`` (CUDA, one host), ``nccl`` (torch.distributed
point-to-point; ``gloo`` on CPU caches), ``auto`` and the in-process ``loopback`` fake.

``auto``: a decode worker whose cache is on CPU serves ``tcp``; on CUDA it serves
the device control channel and, per prefill worker, picks ``cuda_ipc`` when both
caches are on CUDA of one host and ``nccl`` otherwise, from the host ids and
devices exchanged at the handshake (:func:`kvtransfer.device_handshake.choose_transport`).
A prefill worker under ``auto`` follows each destination's transport.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvtransfer.auto import AutoKvSender
from kvtransfer.base import KvReceiver, KvSender
from kvtransfer.cuda_ipc import CudaIpcKvReceiver, CudaIpcKvSender
from kvtransfer.device_receiver import DeviceKvReceiver
from kvtransfer.loopback import LoopbackKvReceiver, LoopbackKvSender
from kvtransfer.nccl import NcclKvReceiver, NcclKvSender
from kvtransfer.tcp import TcpKvReceiver, TcpKvSender

if TYPE_CHECKING:
    import torch

#: Backend name → (sender class, receiver class).
BACKENDS: dict[str, tuple[type[KvSender], type[KvReceiver]]] = {
    "tcp": (TcpKvSender, TcpKvReceiver),
    "cuda_ipc": (CudaIpcKvSender, CudaIpcKvReceiver),
    "nccl": (NcclKvSender, NcclKvReceiver),
    "auto": (AutoKvSender, DeviceKvReceiver),
    "loopback": (LoopbackKvSender, LoopbackKvReceiver),
}

#: Names accepted by ``--kv-transport``.
TRANSPORT_CHOICES: Sequence[str] = ("auto", "cuda_ipc", "nccl", "tcp")


def available_backends() -> list[str]:
    """Names of the registered backends, sorted."""
    return sorted(BACKENDS)


def get_backend(name: str) -> tuple[type[KvSender], type[KvReceiver]]:
    """The ``(sender class, receiver class)`` of backend ``name``.

    Raises:
        ValueError: unknown name; the message lists the available backends.
    """
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown KV transfer backend {name!r}; available: {', '.join(available_backends())}"
        ) from None


def receiver_backend(name: str, kv_cache: torch.Tensor) -> str:
    """The backend a decode worker configured with ``name`` serves for ``kv_cache``: ``auto`` on a
    CPU cache is ``tcp`` (device transports need a device on both sides); anything else as given."""
    if name == "auto" and kv_cache.device.type != "cuda":
        return "tcp"
    return name
