"""The router's view of the workers: registry, channels, health, in-flight load.

Lifecycle of a worker in the pool:
  1. the refresh task (every ``refresh_interval_s``) reads the registry
     (:class:`engine.worker_registry.WorkerDirectory`); a worker seen for the
     first time, or with a new epoch or address, gets a new ``grpc.aio`` channel
     (the old one is closed);
  2. every refresh calls ``grpc.health.v1.Health/Check`` (service ``""``) on each
     known worker; only ``SERVING`` workers are returned by :meth:`WorkerPool.healthy`;
  3. requests routed to a worker are counted (:meth:`WorkerPool.acquire` /
     :meth:`WorkerPool.release`, or :meth:`WorkerPool.in_flight`) so that
     routing sees them before the worker's next heartbeat;
  4. a worker that leaves the registry (deregistered or expired) stays
     routable for ``missing_grace_s`` (one registration TTL) while its own
     health check passes: Redis restarting empty, or a missed heartbeat, must
     not drop a live worker before it re-registers. It is dropped at once when
     its health check fails (a draining worker reports NOT_SERVING, a dead one
     does not answer) or a newer epoch replaces it, and otherwise when the
     grace ends;
  5. a dropped worker is no longer returned by :meth:`WorkerPool.healthy`; its
     channel stays open until the requests already routed to it are released
     (a draining worker finishes its streams), then it is closed at the next
     refresh.

If Redis is unreachable, the pool keeps the workers it last saw (and keeps
checking their health), logging one warning: requests keep flowing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.exceptions import RedisError

from engine.errors import WorkerUnavailable
from engine.worker_registry import WorkerDirectory
from router.routing import WorkerView
from tandem.v1 import worker_pb2

logger = logging.getLogger(__name__)


@dataclass
class _Worker:
    """A known worker: its last registration, channel, health and router-side load."""

    info: worker_pb2.WorkerInfo
    channel: grpc.aio.Channel
    healthy: bool = False
    inflight: int = 0
    inflight_tokens: int = 0
    missing_since: float | None = None  # monotonic seconds; set while absent from the registry

    def view(self) -> WorkerView:
        return WorkerView(
            worker_id=self.info.worker_id,
            epoch=self.info.epoch,
            role=self.info.role,
            grpc_address=self.info.grpc_address,
            info=self.info,
            inflight=self.inflight,
            inflight_tokens=self.inflight_tokens,
        )


class WorkerPool:
    """Healthy workers by role, one gRPC channel each, and in-flight accounting.

    Args:
        directory: registry reader (owned by the caller; not closed here).
        refresh_interval_s: seconds between registry reads and health checks.
        health_check_timeout_s: deadline of one ``Health/Check`` call in seconds.
        channel_factory: opens the channel to a worker's address (TLS and the
            internal token: ``engine.security.open_aio_channel``); default plaintext.
        missing_grace_s: seconds a healthy worker absent from the registry stays
            routable (the workers' registration TTL).
    """

    def __init__(
        self,
        directory: WorkerDirectory,
        *,
        refresh_interval_s: float,
        health_check_timeout_s: float = 1.0,
        channel_factory: Callable[[str], grpc.aio.Channel] | None = None,
        missing_grace_s: float = 5.0,
    ) -> None:
        self._directory = directory
        # Looked up at call time: tracing wraps ``grpc.aio.insecure_channel`` after import.
        self._channel_factory = channel_factory or (lambda address: grpc.aio.insecure_channel(address))
        self._interval_s = refresh_interval_s
        self._health_timeout_s = health_check_timeout_s
        self._missing_grace_s = missing_grace_s
        self._workers: dict[str, _Worker] = {}
        self._retired: dict[str, _Worker] = {}  # left the registry; requests still in flight
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._directory_down = False

    async def start(self) -> None:
        """Refresh once, then keep refreshing in a background task."""
        assert self._task is None, "start() called twice"
        await self.refresh()
        self._task = asyncio.create_task(self._refresh_loop(), name="worker-pool-refresh")

    async def close(self) -> None:
        """Stop refreshing and close every channel."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        async with self._lock:
            workers = [*self._workers.values(), *self._retired.values()]
            self._workers, self._retired = {}, {}
            await asyncio.gather(*(w.channel.close() for w in workers))

    async def refresh(self) -> None:
        """Read the registry, open and close channels, and check every worker's health."""
        async with self._lock:
            try:
                infos = await self._directory.list_workers()
            except (RedisError, OSError) as exc:
                if not self._directory_down:
                    logger.warning(
                        "worker registry unreachable, keeping %d known workers: %s", len(self._workers), exc
                    )
                self._directory_down = True
            else:
                if self._directory_down:
                    logger.info("worker registry reachable again")
                self._directory_down = False
                await self._sync(infos)
            idle = [wid for wid, w in self._retired.items() if w.inflight == 0]
            await asyncio.gather(*(self._retired.pop(wid).channel.close() for wid in idle))
            await self._check_health()

    async def _sync(self, infos: list[worker_pb2.WorkerInfo]) -> None:
        """Make the known workers match ``infos`` (the registry's live workers)."""
        seen = {info.worker_id: info for info in infos}
        stale: list[_Worker] = []
        now = time.monotonic()
        for worker_id in [wid for wid in self._workers if wid not in seen]:
            worker = self._workers[worker_id]
            if worker.missing_since is None and worker.healthy:
                worker.missing_since = now
                logger.info(
                    "worker %s left the registry; routable for %g s while its health check passes",
                    worker_id,
                    self._missing_grace_s,
                )
            if not worker.healthy or now - (worker.missing_since or now) >= self._missing_grace_s:
                self._retire(worker_id, "left the registry")
        for worker_id, info in seen.items():
            known = self._workers.get(worker_id) or self._retired.pop(worker_id, None)
            if known is not None and (known.info.epoch, known.info.grpc_address) == (
                info.epoch,
                info.grpc_address,
            ):
                known.info = info
                known.missing_since = None
                self._workers[worker_id] = known  # back from retirement (e.g. the registry was wiped)
                continue
            if known is not None:
                logger.info("worker %s restarted (epoch %d -> %d)", worker_id, known.info.epoch, info.epoch)
                stale.append(known)
            # In-flight counts carry over so that releases of older requests balance.
            self._workers[worker_id] = _Worker(
                info=info,
                channel=self._channel_factory(info.grpc_address),
                inflight=known.inflight if known else 0,
                inflight_tokens=known.inflight_tokens if known else 0,
            )
        await asyncio.gather(*(w.channel.close() for w in stale))

    def _retire(self, worker_id: str, why: str) -> None:
        """Stop routing to ``worker_id``; its channel closes once its requests are released."""
        logger.info("worker %s dropped: %s", worker_id, why)
        self._retired[worker_id] = self._workers.pop(worker_id)

    async def _check_health(self) -> None:
        workers = list(self._workers.values())
        results = await asyncio.gather(*(self._is_serving(w.channel) for w in workers))
        for worker, serving in zip(workers, results, strict=True):
            if serving != worker.healthy:
                logger.info("worker %s is %s", worker.info.worker_id, "healthy" if serving else "unhealthy")
            worker.healthy = serving
            if worker.missing_since is not None and not serving:
                self._retire(worker.info.worker_id, "absent from the registry and its health check failed")

    async def _is_serving(self, channel: grpc.aio.Channel) -> bool:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=self._health_timeout_s
            )
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.refresh()
            except Exception:
                logger.exception("worker pool refresh failed")

    def healthy(self, role: worker_pb2.WorkerRole) -> list[WorkerView]:
        """Snapshots of the healthy workers of ``role``, sorted by worker id."""
        return [w.view() for wid, w in sorted(self._workers.items()) if w.healthy and w.info.role == role]

    def channel(self, worker_id: str) -> grpc.aio.Channel:
        """The channel to ``worker_id``'s current incarnation.

        Raises:
            WorkerUnavailable: the worker is not (or no longer) known.
        """
        worker = self._workers.get(worker_id)
        if worker is None:
            raise WorkerUnavailable(f"worker {worker_id} is not registered")
        return worker.channel

    def acquire(self, worker_id: str, tokens: int) -> None:
        """Count one request of ``tokens`` prompt tokens as in flight on ``worker_id``.

        Raises:
            WorkerUnavailable: the worker is not known.
        """
        worker = self._workers.get(worker_id)
        if worker is None:
            raise WorkerUnavailable(f"worker {worker_id} is not registered")
        worker.inflight += 1
        worker.inflight_tokens += tokens

    def release(self, worker_id: str, tokens: int) -> None:
        """Undo one :meth:`acquire`; a no-op when the worker's channel was closed since."""
        worker = self._workers.get(worker_id) or self._retired.get(worker_id)
        if worker is None:
            return
        # A worker that left and came back starts from zero; never go below it.
        worker.inflight = max(worker.inflight - 1, 0)
        worker.inflight_tokens = max(worker.inflight_tokens - tokens, 0)

    @contextlib.contextmanager
    def in_flight(self, worker_id: str, tokens: int) -> Iterator[None]:
        """``acquire`` on entry and ``release`` on exit (also on error or cancellation)."""
        self.acquire(worker_id, tokens)
        try:
            yield
        finally:
            self.release(worker_id, tokens)

    def can_route(self) -> bool:
        """Whether a request could be served now: a healthy colocated worker, or a healthy
        prefill and a healthy decode worker."""
        return bool(self.healthy(worker_pb2.WORKER_ROLE_COLOCATED)) or bool(
            self.healthy(worker_pb2.WORKER_ROLE_PREFILL) and self.healthy(worker_pb2.WORKER_ROLE_DECODE)
        )

    async def wait_until_routable(self, poll_s: float = 0.05) -> None:
        """Return once :meth:`can_route` holds (the background refresh fills the pool)."""
        while not self.can_route():
            await asyncio.sleep(poll_s)

    async def wait_for_workers(self, prefill: int = 1, decode: int = 1, timeout_s: float = 10.0) -> None:
        """Refresh until at least ``prefill`` and ``decode`` workers are healthy.

        Raises:
            WorkerUnavailable: not enough healthy workers after ``timeout_s`` seconds.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            await self.refresh()
            num_prefill = len(self.healthy(worker_pb2.WORKER_ROLE_PREFILL))
            num_decode = len(self.healthy(worker_pb2.WORKER_ROLE_DECODE))
            if num_prefill >= prefill and num_decode >= decode:
                return
            if time.monotonic() >= deadline:
                raise WorkerUnavailable(
                    f"after {timeout_s} s: {num_prefill}/{prefill} prefill and "
                    f"{num_decode}/{decode} decode workers healthy"
                )
            await asyncio.sleep(min(self._interval_s, 0.1))
