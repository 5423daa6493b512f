"""Decode-side block reservations under leases.

A reservation is made by ``Reserve`` (blocks taken from the pool), filled by a
prefill worker through ``kvtransfer``, and ends exactly once, in one of three
ways: ``claim`` (the ``Decode`` call turns it into a running request, which
then owns the blocks), ``release`` (the router gives it back), or lease expiry
(nobody claimed it in time). Whichever comes first wins; the others find
nothing, so blocks are freed exactly once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from engine.errors import ReservationNotFound


@dataclass
class Reservation:
    """Blocks held for one request until a prefill worker fills them.

    Attributes:
        reservation_id: unique per worker incarnation.
        request_id: the public request id (for logs).
        epoch: the worker incarnation that made it.
        block_ids: reserved block ids, in prompt order.
        num_prompt_tokens: tokens the blocks are for.
        expires_unix_ms: wall-clock lease end (Unix epoch, milliseconds).
    """

    reservation_id: str
    request_id: str
    epoch: int
    block_ids: list[int]
    num_prompt_tokens: int
    expires_unix_ms: int
    timer: asyncio.TimerHandle | None = None


class ReservationTable:
    """Live reservations of one decode worker, each with a lease timer.

    Args:
        epoch: this worker's incarnation; claims for another epoch are refused.
        on_expire: called (on the event loop) with a reservation whose lease
            ran out; it must free the blocks.
    """

    def __init__(self, epoch: int, on_expire: Callable[[Reservation], None]) -> None:
        self._epoch = epoch
        self._on_expire = on_expire
        self._live: dict[str, Reservation] = {}

    def __len__(self) -> int:
        return len(self._live)

    def add(self, reservation: Reservation, lease_s: float) -> None:
        """Track ``reservation`` and arm its lease of ``lease_s`` seconds."""
        loop = asyncio.get_running_loop()
        reservation.timer = loop.call_later(lease_s, self._expire, reservation.reservation_id)
        self._live[reservation.reservation_id] = reservation

    def claim(self, reservation_id: str, epoch: int) -> Reservation:
        """End the reservation because ``Decode`` takes its blocks over.

        Raises:
            ReservationNotFound: unknown, already ended, expired, or another epoch.
        """
        if epoch != self._epoch:
            raise ReservationNotFound(
                f"reservation {reservation_id} is for epoch {epoch}, this worker is epoch {self._epoch}"
            )
        reservation = self._pop(reservation_id)
        if reservation is None:
            raise ReservationNotFound(f"reservation {reservation_id} is unknown, released or expired")
        return reservation

    def release(self, reservation_id: str, epoch: int) -> Reservation | None:
        """End the reservation because the router gives it back; None if already ended."""
        return self._pop(reservation_id) if epoch == self._epoch else None

    def release_request(self, request_id: str) -> list[Reservation]:
        """End every live reservation of ``request_id`` (the router lost their ids)."""
        ids = [r.reservation_id for r in self._live.values() if r.request_id == request_id]
        return [r for r in map(self._pop, ids) if r is not None]

    def _pop(self, reservation_id: str) -> Reservation | None:
        reservation = self._live.pop(reservation_id, None)
        if reservation is not None and reservation.timer is not None:
            reservation.timer.cancel()
        return reservation

    def _expire(self, reservation_id: str) -> None:
        reservation = self._live.pop(reservation_id, None)
        if reservation is not None:
            self._on_expire(reservation)


def lease_expiry_unix_ms(lease_s: float) -> int:
    """Wall-clock end of a lease starting now (Unix epoch, milliseconds)."""
    return int((time.time() + lease_s) * 1000)
