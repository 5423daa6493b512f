"""Network helpers for tests (loopback only)."""

from __future__ import annotations

from cli.supervisor import free_port as _free_port


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (see :func:`cli.supervisor.free_port`)."""
    return _free_port("127.0.0.1")
