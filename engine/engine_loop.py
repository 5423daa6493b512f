"""Runs an engine core on its own thread, off the asyncio event loop.

Servicers are async and thin (STYLE.md): they never touch the engine's state
directly. Every operation on the core (add, abort, reserve, read a block table)
is a *command* executed on the engine thread between two steps, so the core
needs no locks; each request's outputs come back on an ``asyncio.Queue``.

Loop of the engine thread:
  1. run every pending command, resolving its future on the event loop;
  2. if requests are unfinished, run one ``step()`` and hand each output to its
     request's queue; otherwise sleep until a command arrives;
  3. publish a :class:`LoadSnapshot` (read by heartbeats and metrics).

With asynchronous scheduling (``EngineCore(async_scheduling=True)``) a step
may still run on the device while commands execute; the core then counts as
busy (``has_unfinished_requests``) until that step's results are applied, and
frees the blocks of a request aborted meanwhile only once the step is done.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
C = TypeVar("C", bound="SteppableCore")


class SteppableCore(Protocol):
    """What the loop needs of an engine core."""

    #: Tokens computed by the last step; 0 means nothing could be scheduled
    #: (e.g. every block is held by reservations), so the loop waits for a command.
    last_num_scheduled_tokens: int

    def step(self) -> list[Any]: ...

    def has_unfinished_requests(self) -> bool: ...


@dataclass(frozen=True)
class LoadSnapshot:
    """Load of a worker, refreshed after every step (counts of blocks and requests)."""

    num_kv_blocks_total: int = 0
    num_kv_blocks_used: int = 0
    num_requests_running: int = 0
    num_requests_waiting: int = 0
    num_tokens_waiting: int = 0


class EngineLoop(Generic[C]):
    """Owns ``core`` and drives it from a daemon thread.

    Args:
        core: the engine core; used only from the engine thread after start.
        load_fn: called on the engine thread after each step/command batch to
            compute the published :class:`LoadSnapshot`.
    """

    def __init__(self, core: C, load_fn: Callable[[C], LoadSnapshot]) -> None:
        self._core = core
        self._load_fn = load_fn
        self._commands: queue.SimpleQueue[tuple[Callable[[C], Any], asyncio.Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._queues: dict[str, asyncio.Queue[Any]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.load = load_fn(core)
        self.error: BaseException | None = None

    def start(self) -> None:
        """Start the engine thread; outputs are delivered on the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the engine thread after the current step."""
        self._commands.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)

    async def call(self, fn: Callable[[C], T]) -> T:
        """Run ``fn(core)`` on the engine thread between steps and return its result.

        Raises:
            Whatever ``fn`` raised.
        """
        assert self._loop is not None, "EngineLoop.start() was not called"
        future: asyncio.Future[T] = self._loop.create_future()
        self._commands.put((fn, future))
        return await future

    def open_stream(self, req_id: str) -> asyncio.Queue[Any]:
        """Create the queue on which ``req_id``'s outputs will arrive (call before adding it)."""
        q: asyncio.Queue[Any] = asyncio.Queue()
        self._queues[req_id] = q
        return q

    def close_stream(self, req_id: str) -> None:
        """Forget ``req_id``'s queue (after its last output, an abort or an error)."""
        self._queues.pop(req_id, None)

    # -- engine thread -------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                busy = self._core.has_unfinished_requests() and self._core.last_num_scheduled_tokens > 0
                if not self._drain_commands(block=not busy):
                    return
                if self._core.has_unfinished_requests():
                    outputs = self._core.step()
                    self._deliver(outputs)
                self.load = self._load_fn(self._core)
        except BaseException as exc:  # the worker cannot go on; surface it
            logger.exception("engine loop crashed")
            self.error = exc
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._fail_all, exc)

    def _drain_commands(self, block: bool) -> bool:
        """Run pending commands; wait for one when ``block``. False means stop."""
        try:
            item = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            if item is None:
                return False
            fn, future = item
            try:
                result = fn(self._core)
            except Exception as exc:
                self.load = self._load_fn(self._core)
                self._resolve(future, None, exc)
            else:
                self.load = self._load_fn(self._core)  # before the caller sees the result
                self._resolve(future, result, None)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _resolve(self, future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
        def settle() -> None:
            if future.cancelled():
                return
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(result)

        assert self._loop is not None
        self._loop.call_soon_threadsafe(settle)

    def _deliver(self, outputs: list[Any]) -> None:
        assert self._loop is not None
        for out in outputs:
            q = self._queues.get(out.req_id)
            if q is not None:
                self._loop.call_soon_threadsafe(q.put_nowait, out)

    def _fail_all(self, exc: BaseException) -> None:
        for q in self._queues.values():
            q.put_nowait(exc)
