"""Waiting for CUDA work from the event loop (used by ``cuda_ipc`` and layer-wise streaming)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: Seconds :func:`wait_cuda_event` polls on the event loop before it blocks a worker thread instead.
EVENT_SPIN_S = 0.005


async def wait_cuda_event(event: torch.cuda.Event) -> None:
    """Return once the GPU passed ``event``, without blocking the event loop.

    Polls ``event.query()`` between event-loop turns for up to :data:`EVENT_SPIN_S`
    (copies of KV take microseconds to a millisecond; a thread hop or a stream sync
    would cost as much), then waits in a worker thread.
    """
    deadline = time.perf_counter() + EVENT_SPIN_S
    while not event.query():
        if time.perf_counter() > deadline:
            await asyncio.to_thread(event.synchronize)
            return
        await asyncio.sleep(0)
