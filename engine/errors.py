"""Tandem's error types (torch-free).

A small hierarchy, each mapped to one gRPC status code in exactly one place
(:func:`grpc_status_name`), so services never choose codes ad hoc.
"""

from __future__ import annotations


class TandemError(Exception):
    """Base class of every error Tandem raises on purpose."""

    #: Name of the ``grpc.StatusCode`` member this error maps to.
    grpc_code: str = "INTERNAL"


class InvalidRequest(TandemError):
    """The caller's request is malformed; the message names the field to fix."""

    grpc_code = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class CapacityExceeded(TandemError):
    """A queue or pool is full; retry later or elsewhere."""

    grpc_code = "RESOURCE_EXHAUSTED"


class WorkerUnavailable(TandemError):
    """No worker can serve the request now."""

    grpc_code = "UNAVAILABLE"


class TransferFailed(TandemError):
    """A KV transfer failed (connection, layout mismatch, lease expired)."""

    grpc_code = "UNAVAILABLE"


class LayoutMismatch(TransferFailed):
    """Sender and receiver disagree on the KV cache layout."""

    grpc_code = "FAILED_PRECONDITION"


class DataCorruption(TransferFailed):
    """A transferred block's checksum did not match."""

    grpc_code = "DATA_LOSS"


class ReservationNotFound(TandemError):
    """The reservation is unknown, released, expired or from another epoch."""

    grpc_code = "FAILED_PRECONDITION"


class RequestAborted(TandemError):
    """The request was cancelled or its deadline passed."""

    grpc_code = "CANCELLED"


def grpc_status_name(exc: BaseException) -> str:
    """Name of the ``grpc.StatusCode`` member for ``exc`` (``INTERNAL`` for foreign errors)."""
    return exc.grpc_code if isinstance(exc, TandemError) else "INTERNAL"
