"""Worker registry in Redis (torch-free): workers register, the router reads.

Keys, all under a configurable ``prefix``:

- ``{prefix}:worker:{worker_id}``: the worker's serialized ``tandem.v1.WorkerInfo``
  (protobuf bytes, never pickle), written with a TTL of ``ttl_s`` and refreshed
  by every heartbeat; a worker that stops heartbeating disappears after the TTL.
- ``{prefix}:epoch:{worker_id}``: a counter incremented (``INCR``) at each start
  of the worker; its value is the worker's *epoch* (incarnation number), used for
  fencing: a heartbeat of an older incarnation never overwrites a newer one.
- ``{prefix}:workers``: the set of known worker ids; readers prune ids whose
  registration key has expired.

Lifecycle of a :class:`WorkerRegistration`:
  1. ``start()``: ``INCR`` the epoch counter, write the registration, start the
     heartbeat task;
  2. every ``heartbeat_interval_s``: refresh the load fields and
     ``heartbeat_unix_ms`` from ``load_fn`` and rewrite the key with a fresh TTL.
     While Redis is unreachable the task logs one warning and keeps retrying;
     once Redis is back it re-registers with the same epoch (restoring the epoch
     counter if Redis lost it);
  3. ``stop()``: cancel the heartbeat and delete the registration (only if it
     still belongs to this epoch).

Passwords and TLS travel in the URL (``redis://:password@host:port/0``,
``rediss://host:port/0``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import cast

import redis.asyncio as aioredis
from google.protobuf.message import DecodeError
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, WatchError

from engine.engine_loop import LoadSnapshot
from tandem.v1 import worker_pb2

logger = logging.getLogger(__name__)

# KEYS: epoch key, worker key, workers set. ARGV: epoch, worker_pb2.WorkerInfo bytes, TTL (ms), worker id.
# Returns 0 (and writes nothing) when a newer incarnation holds the epoch counter.
_HEARTBEAT_LUA = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local epoch = tonumber(ARGV[1])
if current > epoch then return 0 end
if current < epoch then redis.call('SET', KEYS[1], ARGV[1]) end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('SADD', KEYS[3], ARGV[4])
return 1
"""

# KEYS: workers set. ARGV[1]: worker key prefix; ARGV[2..]: ids to drop if their key is gone.
_PRUNE_LUA = """
local removed = 0
for i = 2, #ARGV do
  if redis.call('EXISTS', ARGV[1] .. ARGV[i]) == 0 then
    removed = removed + redis.call('SREM', KEYS[1], ARGV[i])
  end
end
return removed
"""


def worker_key(prefix: str, worker_id: str) -> str:
    """Key of ``worker_id``'s registration (``WorkerInfo`` bytes with a TTL)."""
    return f"{prefix}:worker:{worker_id}"


def epoch_key(prefix: str, worker_id: str) -> str:
    """Key of ``worker_id``'s epoch counter."""
    return f"{prefix}:epoch:{worker_id}"


def workers_key(prefix: str) -> str:
    """Key of the set of known worker ids."""
    return f"{prefix}:workers"


def connect(redis_url: str, *, timeout_s: float = 1.0) -> aioredis.Redis:
    """An asyncio Redis client that fails fast (one immediate reconnect, no backoff).

    Args:
        redis_url: ``redis://[:password@]host:port/db`` or ``rediss://`` for TLS.
        timeout_s: connect and per-command socket timeout in seconds.
    """
    return aioredis.from_url(
        redis_url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1),
    )


def apply_load(info: worker_pb2.WorkerInfo, load: LoadSnapshot) -> None:
    """Copy ``load`` (block and request counts) into ``info``'s load fields."""
    info.num_kv_blocks_total = load.num_kv_blocks_total
    info.num_kv_blocks_free = max(load.num_kv_blocks_total - load.num_kv_blocks_used, 0)
    info.num_requests_running = load.num_requests_running
    info.num_requests_waiting = load.num_requests_waiting
    info.num_tokens_waiting = load.num_tokens_waiting


class WorkerRegistration:
    """One worker's registration, kept alive by a heartbeat task.

    Args:
        redis_url: Redis server (password and TLS in the URL).
        prefix: prefix of every key.
        info: the worker's identity (id, role, addresses, model, layout); its
            ``epoch``, load fields and ``heartbeat_unix_ms`` are filled in here.
        ttl_s: TTL of the registration key in seconds.
        heartbeat_interval_s: seconds between heartbeats (should be well below ``ttl_s``).
        load_fn: returns the current load; ``None`` publishes the load fields of ``info``.
    """

    def __init__(
        self,
        redis_url: str,
        prefix: str,
        info: worker_pb2.WorkerInfo,
        *,
        ttl_s: float,
        heartbeat_interval_s: float,
        load_fn: Callable[[], LoadSnapshot] | None = None,
    ) -> None:
        if not info.worker_id:
            raise ValueError("info.worker_id must be set")
        if ttl_s <= 0 or heartbeat_interval_s <= 0:
            raise ValueError(f"ttl_s ({ttl_s}) and heartbeat_interval_s ({heartbeat_interval_s}) must be > 0")
        self._prefix = prefix
        self._info = worker_pb2.WorkerInfo()
        self._info.CopyFrom(info)
        self._ttl_ms = max(int(ttl_s * 1000), 1)
        self._interval_s = heartbeat_interval_s
        self._load_fn = load_fn
        self._redis = connect(redis_url, timeout_s=min(max(heartbeat_interval_s, 0.2), 1.0))
        self._heartbeat_script = self._redis.register_script(_HEARTBEAT_LUA)
        self._task: asyncio.Task[None] | None = None
        self._epoch = 0
        self._redis_down = False
        self.superseded = False

    @property
    def epoch(self) -> int:
        """Epoch assigned by :meth:`start` (0 before)."""
        return self._epoch

    @property
    def worker_id(self) -> str:
        return self._info.worker_id

    async def start(self) -> int:
        """Take a new epoch, register and start heartbeating.

        Returns:
            The epoch (1 at the first start of this worker id).

        Raises:
            redis.exceptions.RedisError: Redis is unreachable at start (a worker
                cannot take an epoch without it).
        """
        assert self._task is None, "start() called twice"
        self._epoch = int(await self._redis.incr(epoch_key(self._prefix, self.worker_id)))
        self._info.epoch = self._epoch
        await self.heartbeat()
        self._task = asyncio.create_task(self._heartbeat_loop(), name=f"heartbeat-{self.worker_id}")
        return self._epoch

    async def heartbeat(self) -> bool:
        """Refresh the load fields and rewrite the registration with a fresh TTL.

        Returns:
            False when a newer incarnation of this worker id holds the epoch
            (nothing is written then, and :attr:`superseded` becomes True).

        Raises:
            redis.exceptions.RedisError: Redis is unreachable.
        """
        if self._load_fn is not None:
            apply_load(self._info, self._load_fn())
        self._info.heartbeat_unix_ms = int(time.time() * 1000)
        written = await self._heartbeat_script(
            keys=[
                epoch_key(self._prefix, self.worker_id),
                worker_key(self._prefix, self.worker_id),
                workers_key(self._prefix),
            ],
            args=[self._epoch, self._info.SerializeToString(), self._ttl_ms, self.worker_id],
        )
        self.superseded = not written
        return bool(written)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                written = await self.heartbeat()
            except (RedisError, OSError) as exc:
                if not self._redis_down:
                    logger.warning(
                        "worker %s: Redis unreachable, retrying heartbeats: %s", self.worker_id, exc
                    )
                self._redis_down = True
                continue
            if self._redis_down:
                logger.info("worker %s: Redis is back, re-registered epoch %d", self.worker_id, self._epoch)
                self._redis_down = False
            if not written:
                logger.error(
                    "worker %s epoch %d was superseded by a newer incarnation; heartbeats stop",
                    self.worker_id,
                    self._epoch,
                )
                return

    async def stop(self) -> None:
        """Stop heartbeating and deregister (delete the key and the set entry).

        The key is deleted only if it still holds this epoch. Redis errors are
        logged, not raised: the TTL removes the registration anyway.
        """
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await self._deregister()
        except (RedisError, OSError) as exc:
            logger.warning("worker %s: could not deregister (the TTL will): %s", self.worker_id, exc)
        finally:
            await self._redis.aclose()

    async def _deregister(self) -> None:
        key = worker_key(self._prefix, self.worker_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(key)
                raw = await pipe.get(key)
                if (
                    raw is not None
                    and worker_pb2.WorkerInfo.FromString(cast(bytes, raw)).epoch != self._epoch
                ):
                    return
                pipe.multi()
                pipe.delete(key)
                pipe.srem(workers_key(self._prefix), self.worker_id)
                await pipe.execute()
            except WatchError:
                logger.info("worker %s: registration changed during stop; left in place", self.worker_id)


class WorkerDirectory:
    """Router-side reader of the registry.

    Args:
        redis_url: Redis server (password and TLS in the URL).
        prefix: prefix of every key.
        timeout_s: connect and per-command timeout in seconds.
    """

    def __init__(self, redis_url: str, prefix: str, *, timeout_s: float = 1.0) -> None:
        self._prefix = prefix
        self._redis = connect(redis_url, timeout_s=timeout_s)
        self._prune_script = self._redis.register_script(_PRUNE_LUA)

    async def list_workers(self, role: worker_pb2.WorkerRole | None = None) -> list[worker_pb2.WorkerInfo]:
        """Live registrations, sorted by worker id.

        Ids whose key expired are removed from the set (only if still expired
        when pruning); entries that fail to parse are skipped with a warning.

        Args:
            role: keep only workers of this role; ``None`` keeps all.

        Raises:
            redis.exceptions.RedisError: Redis is unreachable.
        """
        members = await self._redis.smembers(workers_key(self._prefix))
        ids = sorted(m.decode() if isinstance(m, bytes) else m for m in members)
        if not ids:
            return []
        raws = await self._redis.mget([worker_key(self._prefix, i) for i in ids])
        expired = [i for i, raw in zip(ids, raws, strict=True) if raw is None]
        if expired:
            await self._prune_script(
                keys=[workers_key(self._prefix)], args=[worker_key(self._prefix, ""), *expired]
            )
        workers = []
        for worker_id, raw in zip(ids, raws, strict=True):
            if raw is None:
                continue
            try:
                info = worker_pb2.WorkerInfo.FromString(cast(bytes, raw))
            except DecodeError as exc:
                logger.warning("skipping unparsable registration of %r: %s", worker_id, exc)
                continue
            if role is None or info.role == role:
                workers.append(info)
        return workers

    async def close(self) -> None:
        """Close the Redis connections."""
        await self._redis.aclose()
