"""Moving paged KV blocks from a prefill worker into blocks a decode worker reserved.

Torch is imported only when blocks are actually gathered or scattered, so
importing this package (for :class:`KvLayout`, :class:`KvDestination`, the
registry) stays light.
"""

from kvtransfer.base import KvReceiver, KvSender, ReceivedTransfer, TransferStats
from kvtransfer.checksum import CHECKSUM_ALGORITHM
from kvtransfer.layout import PROTOCOL_VERSION, KvDestination, KvLayout
from kvtransfer.registry import available_backends, get_backend

__all__ = [
    "CHECKSUM_ALGORITHM",
    "PROTOCOL_VERSION",
    "KvDestination",
    "KvLayout",
    "KvReceiver",
    "KvSender",
    "ReceivedTransfer",
    "TransferStats",
    "available_backends",
    "get_backend",
]
