"""Registry of KV transfer backends by name (``KvDestination.transport``, ``WorkerConfig.kv_transport``).

``cuda_ipc`` (same host) and ``nccl`` (across hosts) join here when they exist.
"""

from __future__ import annotations

from kvtransfer.base import KvReceiver, KvSender
from kvtransfer.loopback import LoopbackKvReceiver, LoopbackKvSender
from kvtransfer.tcp import TcpKvReceiver, TcpKvSender

#: Backend name → (sender class, receiver class).
BACKENDS: dict[str, tuple[type[KvSender], type[KvReceiver]]] = {
    "tcp": (TcpKvSender, TcpKvReceiver),
    "loopback": (LoopbackKvSender, LoopbackKvReceiver),
}


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
