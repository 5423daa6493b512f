"""cli.supervisor.free_port hands out ports below the kernel's ephemeral range."""

from __future__ import annotations

import socket

import pytest

from cli import supervisor


def test_ports_come_from_below_the_ephemeral_range_and_are_bindable() -> None:
    floor = supervisor._ephemeral_port_floor()
    ports = {supervisor.free_port() for _ in range(20)}
    assert all(supervisor.FIRST_PORT <= p < floor for p in ports)
    assert len(ports) > 1  # random, not one fixed port
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_taken_port_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        picks = iter([busy, busy, 23456])

        class Scripted:
            def randrange(self, low: int, high: int) -> int:
                return next(picks)

        monkeypatch.setattr(supervisor.random, "SystemRandom", Scripted)
        monkeypatch.setattr(supervisor, "_ephemeral_port_floor", lambda: 60000)
        assert supervisor.free_port() == 23456
