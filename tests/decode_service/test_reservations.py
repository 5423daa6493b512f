"""A reservation ends exactly once: claimed, released, or expired."""

from __future__ import annotations

import asyncio

import pytest

from decode_service.reservations import Reservation, ReservationTable
from engine.errors import ReservationNotFound


def make(rid: str, epoch: int = 7) -> Reservation:
    return Reservation(rid, f"req-{rid}", epoch, [3, 1], 20, 0)


def test_claim_release_and_expiry_each_end_a_reservation_once() -> None:
    async def main() -> list[str]:
        expired: list[str] = []
        table = ReservationTable(7, lambda r: expired.append(r.reservation_id))
        for rid in ("claimed", "released", "expires"):
            table.add(make(rid), lease_s=0.05)
        assert table.claim("claimed", 7).block_ids == [3, 1]
        released = table.release("released", 7)
        assert released is not None and released.reservation_id == "released"
        assert table.release("released", 7) is None  # idempotent
        await asyncio.sleep(0.15)
        assert len(table) == 0
        with pytest.raises(ReservationNotFound):
            table.claim("expires", 7)  # the lease already ended it
        with pytest.raises(ReservationNotFound):
            table.claim("claimed", 7)  # claimed once only
        return expired

    assert asyncio.run(main()) == ["expires"]  # claimed and released ones never expire


def test_other_epoch_is_refused() -> None:
    async def main() -> None:
        table = ReservationTable(7, lambda r: None)
        table.add(make("r"), lease_s=10)
        with pytest.raises(ReservationNotFound, match="epoch 6"):
            table.claim("r", 6)
        assert table.release("r", 6) is None
        assert table.claim("r", 7).reservation_id == "r"

    asyncio.run(main())
