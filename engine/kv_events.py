"""KV events: a worker's prefix-cache changes, published to Redis in batches (torch-free).

Lifecycle of a KV event:
  1. the block pool reports each hash it stores or evicts to the
     :class:`KvEventRecorder` (on the engine thread), which numbers it with the
     worker's next sequence number (1, 2, ... per process, i.e. per epoch) and
     buffers it; the hot path never waits on Redis;
  2. every ``flush_interval_s`` the :class:`KvEventPublisher` (an asyncio task
     on the worker's event loop) drains the buffer and appends each batch of
     contiguous events as one entry to the worker's Redis stream;
  3. a router applies the entries to the ownership index
     (``router/prefix_index.py``), checking that sequence numbers follow each
     other; on a gap it asks the worker for a snapshot, which the publisher
     writes at its next tick.

Redis keys (``{prefix}`` is ``--redis-prefix``; a hash is written as 64 hex digits):

- ``{prefix}:kvev:{worker_id}``: stream, one entry per batch, fields ``epoch``,
  ``first`` (sequence number of the first event), ``ts_ms`` (Unix ms when the
  batch's oldest event was recorded) and ``ev`` (one 65-character record per
  event: ``S`` stored or ``R`` removed, then the hash), trimmed to about
  ``STREAM_MAXLEN`` entries;
- ``{prefix}:kvworkers``: set of worker ids that publish KV events;
- ``{prefix}:kvsnapreq:{worker_id}``: set by a router that needs a snapshot;
- ``{prefix}:kvsnap:{worker_id}``: hash with ``epoch``, ``seq`` (the last event
  the snapshot includes), ``ts_ms`` and ``hashes`` (64 hex digits per cached
  block), written in answer to a request, or unasked when the router's state
  for this worker (``{prefix}:kvseq:{worker_id}``, see ``router/prefix_index.py``)
  disappeared after the publisher had seen it: Redis lost its data, or the
  worker's registration had expired; events would not show a gap then.

While Redis is unreachable events stay buffered (the oldest are dropped past
``max_buffered``, which the router later sees as a gap and repairs from a
snapshot) and one warning is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from prometheus_client import Counter
from redis.exceptions import RedisError

from engine.worker_registry import connect

logger = logging.getLogger(__name__)

#: Approximate length the publisher trims each worker's event stream to (entries).
STREAM_MAXLEN = 10_000
#: Seconds a snapshot stays in Redis if no router applies it.
SNAPSHOT_TTL_S = 60
#: Seconds between snapshots written without a request, while the router's state is missing.
UNASKED_SNAPSHOT_INTERVAL_S = 1.0

STORED = "S"
REMOVED = "R"


def events_key(prefix: str, worker_id: str) -> str:
    """Stream of ``worker_id``'s KV event batches."""
    return f"{prefix}:kvev:{worker_id}"


def publishers_key(prefix: str) -> str:
    """Set of worker ids that publish KV events."""
    return f"{prefix}:kvworkers"


def snapshot_request_key(prefix: str, worker_id: str) -> str:
    """Set by a router that needs a full snapshot of ``worker_id``'s cache."""
    return f"{prefix}:kvsnapreq:{worker_id}"


def state_key(prefix: str, worker_id: str) -> str:
    """The router's applied state of ``worker_id``'s events (hash: epoch, seq, sid)."""
    return f"{prefix}:kvseq:{worker_id}"


def snapshot_key(prefix: str, worker_id: str) -> str:
    """``worker_id``'s latest full snapshot (hash: epoch, seq, ts_ms, hashes)."""
    return f"{prefix}:kvsnap:{worker_id}"


@dataclass(frozen=True)
class KvEvent:
    """One change of a worker's prefix cache.

    Attributes:
        seq: per-worker sequence number (from 1, +1 per event).
        op: :data:`STORED` or :data:`REMOVED`.
        block_hash: the block's chained hash (32 bytes).
        unix_s: wall-clock time it was recorded (seconds).
    """

    seq: int
    op: str
    block_hash: bytes
    unix_s: float


class KvEventRecorder:
    """Numbers and buffers prefix-cache changes (the block pool's ``KvEventSink``). Thread-safe.

    Args:
        max_buffered: most events kept while unpublished; older ones are dropped.
        evictions: counter incremented per evicted block (``tandem_prefix_cache_evictions_total``).
    """

    def __init__(self, max_buffered: int = 200_000, evictions: Counter | None = None) -> None:
        self._lock = threading.Lock()
        self._events: deque[KvEvent] = deque()
        self._max_buffered = max_buffered
        self._evictions = evictions
        #: Sequence number of the last recorded event (0: none yet).
        self.seq = 0
        #: Events dropped because the buffer was full.
        self.num_dropped = 0

    def block_stored(self, block_hash: bytes) -> None:
        self._record(STORED, block_hash)

    def block_removed(self, block_hash: bytes) -> None:
        if self._evictions is not None:
            self._evictions.inc()
        self._record(REMOVED, block_hash)

    def _record(self, op: str, block_hash: bytes) -> None:
        with self._lock:
            self.seq += 1
            self._events.append(KvEvent(self.seq, op, block_hash, time.time()))
            if len(self._events) > self._max_buffered:
                self._events.popleft()
                self.num_dropped += 1

    def __len__(self) -> int:
        with self._lock:
            return len(self._events)

    def drain(self, max_events: int) -> list[KvEvent]:
        """Take up to ``max_events`` buffered events, oldest first.

        Buffered events always have contiguous sequence numbers: only the
        oldest are ever dropped (the gap then lies before the buffer).
        """
        with self._lock:
            return [self._events.popleft() for _ in range(min(max_events, len(self._events)))]

    def put_back(self, batch: list[KvEvent]) -> None:
        """Return an unpublished ``batch`` (from :meth:`drain`) to the front of the buffer."""
        with self._lock:
            self._events.extendleft(reversed(batch))
            while len(self._events) > self._max_buffered:
                self._events.popleft()
                self.num_dropped += 1


def encode_events(batch: list[KvEvent]) -> str:
    """The stream entry's ``ev`` field: per event its op letter and 64 hex digits."""
    return "".join(e.op + e.block_hash.hex() for e in batch)


#: Returns ``(seq, hashes)``: the last recorded sequence number and every cached hash,
#: read together on the engine thread so the snapshot is consistent with the events.
SnapshotFn = Callable[[], Awaitable[tuple[int, list[bytes]]]]


class KvEventPublisher:
    """Publishes a :class:`KvEventRecorder`'s events from an asyncio task.

    Args:
        redis_url: Redis server.
        prefix: prefix of every key.
        worker_id: the publishing worker.
        epoch: its epoch (from the registry).
        recorder: the events to publish.
        snapshot_fn: reads a consistent snapshot of the worker's cache.
        flush_interval_s: seconds between flushes.
        max_batch: most events per stream entry.
    """

    def __init__(
        self,
        redis_url: str,
        prefix: str,
        worker_id: str,
        epoch: int,
        recorder: KvEventRecorder,
        snapshot_fn: SnapshotFn,
        *,
        flush_interval_s: float = 0.05,
        max_batch: int = 1024,
    ) -> None:
        self._prefix = prefix
        self._worker_id = worker_id
        self._epoch = epoch
        self._recorder = recorder
        self._snapshot_fn = snapshot_fn
        self._interval_s = flush_interval_s
        self._max_batch = max_batch
        self._redis = connect(redis_url, timeout_s=1.0)
        self._task: asyncio.Task[None] | None = None
        self._redis_down = False
        self._state_seen = False
        self._resync_pending = False
        self._last_snapshot = -float("inf")
        #: Snapshots written so far.
        self.num_snapshots = 0

    def start(self) -> None:
        """Start the flush task (the event loop must be running)."""
        assert self._task is None, "start() called twice"
        self._task = asyncio.create_task(self._run(), name=f"kv-events-{self._worker_id}")

    async def stop(self) -> None:
        """Stop the task, try a last flush, close the connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(RedisError, OSError):
            await self.flush()
        await self._redis.aclose()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.flush()
            except (RedisError, OSError) as exc:
                if not self._redis_down:
                    logger.warning("worker %s: cannot publish KV events, buffering: %s", self._worker_id, exc)
                self._redis_down = True
                continue
            if self._redis_down:
                logger.info("worker %s: publishing KV events again", self._worker_id)
                self._redis_down = False

    async def flush(self) -> int:
        """Publish every buffered event, then answer a pending snapshot request.

        Returns:
            Number of events published.

        Raises:
            redis.exceptions.RedisError: Redis is unreachable (the events stay buffered).
        """
        batches = []
        while batch := self._recorder.drain(self._max_batch):
            batches.append(batch)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for batch in batches:
                    pipe.xadd(
                        events_key(self._prefix, self._worker_id),
                        {
                            "epoch": self._epoch,
                            "first": batch[0].seq,
                            "ts_ms": int(batch[0].unix_s * 1000),
                            "ev": encode_events(batch),
                        },
                        maxlen=STREAM_MAXLEN,
                        approximate=True,
                    )
                pipe.sadd(publishers_key(self._prefix), self._worker_id)
                pipe.exists(snapshot_request_key(self._prefix, self._worker_id))
                pipe.exists(state_key(self._prefix, self._worker_id))
                results = await pipe.execute()
        except BaseException:
            for batch in reversed(batches):
                self._recorder.put_back(batch)
            raise
        requested, state_exists = results[-2], results[-1]
        if state_exists:
            self._state_seen, self._resync_pending = True, False
        elif self._state_seen:
            self._state_seen, self._resync_pending = False, True
        # Unasked snapshots repeat at most every UNASKED_SNAPSHOT_INTERVAL_S until a router applied one.
        unasked = (
            self._resync_pending and time.monotonic() - self._last_snapshot >= UNASKED_SNAPSHOT_INTERVAL_S
        )
        if requested or unasked:
            await self.write_snapshot()
        return sum(len(b) for b in batches)

    async def write_snapshot(self) -> None:
        """Write ``{prefix}:kvsnap:{worker_id}`` and clear the request.

        Raises:
            redis.exceptions.RedisError: Redis is unreachable.
        """
        seq, hashes = await self._snapshot_fn()
        async with self._redis.pipeline(transaction=True) as pipe:
            key = snapshot_key(self._prefix, self._worker_id)
            pipe.hset(
                key,
                mapping={
                    "epoch": self._epoch,
                    "seq": seq,
                    "ts_ms": int(time.time() * 1000),
                    "hashes": "".join(h.hex() for h in hashes),
                },
            )
            pipe.expire(key, SNAPSHOT_TTL_S)
            pipe.delete(snapshot_request_key(self._prefix, self._worker_id))
            await pipe.execute()
        self.num_snapshots += 1
        self._last_snapshot = time.monotonic()
        logger.info("worker %s: wrote a KV snapshot (%d blocks, seq %d)", self._worker_id, len(hashes), seq)
