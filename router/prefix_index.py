"""The block-ownership index in Redis: kept up to date from KV events, read per request (torch-free).

Index keys (``{prefix}`` is ``--redis-prefix``, ``{hex}`` a block hash in 64 hex digits):

- ``{prefix}:blk:{hex}``: hash ``worker_id -> epoch`` of the workers holding the block;
- ``{prefix}:kvown:{worker_id}``: set of the hashes ``worker_id`` holds (to clear them);
- ``{prefix}:kvseq:{worker_id}``: hash ``epoch``, ``seq`` (last applied event),
  ``sid`` (last consumed stream entry id).

One sync pass (:meth:`PrefixIndex.sync`, one Lua script, so several routers can
run it concurrently and each event is applied exactly once), for every worker
in ``{prefix}:kvworkers`` (``engine/kv_events.py`` describes the worker side):

  1. registration gone (expired or deregistered): clear the worker's entries,
     its stream, state and snapshot; with the epoch counter gone too, Redis
     lost its data and the worker has not re-registered yet: skip it for now
     (status ``unknown``; its publisher then writes a snapshot unasked);
  2. a newer epoch in ``{prefix}:epoch:{worker_id}`` than the applied one (the
     worker restarted): clear the old incarnation's entries, start at seq 0;
  3. a snapshot of the current epoch with ``seq`` at least the applied one:
     replace the worker's entries with it, continue after its ``seq``;
  4. apply the stream entries after ``sid`` in order: an older epoch's entry
     is skipped, events already applied are skipped, and an entry whose first
     event is not the next sequence number is a **gap**: the pass stops there
     for this worker and sets ``{prefix}:kvsnapreq:{worker_id}`` so that the
     worker writes a snapshot (step 3 of a later pass resynchronises).

Lookups (:meth:`PrefixIndex.lookup`) are one Lua script too: for each candidate
worker, the number of leading prompt blocks it holds in its current epoch.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from redis.exceptions import RedisError

from engine.hashing import hash_prompt_blocks
from engine.worker_registry import connect
from router.routing import RoutingRequest, WorkerView

logger = logging.getLogger(__name__)

# ARGV: prefix, most stream entries per worker and pass.
# Returns per worker {worker_id, status ('ok'|'gap'|'gone'|'unknown'), events applied, ts_ms of the
# oldest unapplied entry (0: none)}.
_SYNC_LUA = """
local P = ARGV[1]
local maxn = tonumber(ARGV[2])
local out = {}
local function clear(w, ownk)
  for _, h in ipairs(redis.call('SMEMBERS', ownk)) do redis.call('HDEL', P .. ':blk:' .. h, w) end
  redis.call('DEL', ownk)
end
local function store(w, epoch, ownk, h)
  redis.call('HSET', P .. ':blk:' .. h, w, epoch)
  redis.call('SADD', ownk, h)
end
local function apply(w, epoch, ownk, ev, skip)
  for i = skip, #ev / 65 - 1 do
    local h = string.sub(ev, i * 65 + 2, i * 65 + 65)
    if string.sub(ev, i * 65 + 1, i * 65 + 1) == 'S' then
      store(w, epoch, ownk, h)
    else
      redis.call('HDEL', P .. ':blk:' .. h, w)
      redis.call('SREM', ownk, h)
    end
  end
end
local function fields(e)
  local f = {}
  for i = 1, #e[2], 2 do f[e[2][i]] = e[2][i + 1] end
  return f
end
for _, w in ipairs(redis.call('SMEMBERS', P .. ':kvworkers')) do
  local sk, stk, ownk = P .. ':kvev:' .. w, P .. ':kvseq:' .. w, P .. ':kvown:' .. w
  local snapk, reqk = P .. ':kvsnap:' .. w, P .. ':kvsnapreq:' .. w
  local registered = redis.call('EXISTS', P .. ':worker:' .. w) == 1
  if not registered and redis.call('EXISTS', P .. ':epoch:' .. w) == 0 then
    table.insert(out, {w, 'unknown', 0, 0})
  elseif not registered then
    clear(w, ownk)
    redis.call('DEL', sk, stk, snapk, reqk)
    redis.call('SREM', P .. ':kvworkers', w)
    table.insert(out, {w, 'gone', 0, 0})
  else
    local st = redis.call('HMGET', stk, 'epoch', 'seq', 'sid')
    local epoch, seq, sid = tonumber(st[1] or '0'), tonumber(st[2] or '0'), st[3] or '0-0'
    local reg_epoch = tonumber(redis.call('GET', P .. ':epoch:' .. w) or '0')
    if reg_epoch > epoch then clear(w, ownk); epoch = reg_epoch; seq = 0 end
    local snap = redis.call('HMGET', snapk, 'epoch', 'seq', 'hashes')
    if snap[1] then
      if tonumber(snap[1]) == epoch and tonumber(snap[2]) >= seq then
        clear(w, ownk)
        for i = 0, #snap[3] / 64 - 1 do store(w, epoch, ownk, string.sub(snap[3], i * 64 + 1, i * 64 + 64)) end
        seq = tonumber(snap[2])
        redis.call('DEL', reqk)
      end
      redis.call('DEL', snapk)
    end
    local status, applied = 'ok', 0
    for _, e in ipairs(redis.call('XRANGE', sk, '(' .. sid, '+', 'COUNT', maxn)) do
      local f = fields(e)
      local e_epoch, first, n = tonumber(f['epoch']), tonumber(f['first']), #f['ev'] / 65
      if e_epoch > epoch then clear(w, ownk); epoch = e_epoch; seq = 0 end
      if e_epoch == epoch and first + n - 1 > seq then
        if first > seq + 1 then status = 'gap'; break end
        apply(w, epoch, ownk, f['ev'], seq - first + 1)
        applied = applied + first + n - 1 - seq
        seq = first + n - 1
      end
      sid = e[1]
    end
    if status == 'gap' then redis.call('SET', reqk, '1', 'EX', 30) end
    redis.call('HSET', stk, 'epoch', epoch, 'seq', seq, 'sid', sid)
    local oldest = 0
    local rest = redis.call('XRANGE', sk, '(' .. sid, '+', 'COUNT', 1)
    if #rest > 0 then oldest = tonumber(fields(rest[1])['ts_ms']) end
    table.insert(out, {w, status, applied, oldest})
  end
end
return out
"""

# ARGV: prefix, number of workers W, W worker ids, W epochs, then the block hashes (hex) in order.
# Returns per worker the number of leading blocks it holds in that epoch.
_LOOKUP_LUA = """
local P = ARGV[1]
local nw = tonumber(ARGV[2])
local ids, counts, alive = {}, {}, nw
for i = 1, nw do ids[i] = ARGV[2 + i]; counts[i] = 0 end
for j = 3 + 2 * nw, #ARGV do
  local vals = redis.call('HMGET', P .. ':blk:' .. ARGV[j], unpack(ids))
  alive = 0
  for i = 1, nw do
    if counts[i] == j - 3 - 2 * nw and vals[i] == ARGV[2 + nw + i] then
      counts[i] = counts[i] + 1
      alive = alive + 1
    end
  end
  if alive == 0 then break end
end
return counts
"""


def blk_key(prefix: str, block_hash: bytes) -> str:
    """Key of ``block_hash``'s owners (hash ``worker_id -> epoch``)."""
    return f"{prefix}:blk:{block_hash.hex()}"


def owned_key(prefix: str, worker_id: str) -> str:
    """Set of the block hashes (hex) ``worker_id`` holds."""
    return f"{prefix}:kvown:{worker_id}"


@dataclass(frozen=True)
class SyncResult:
    """What one sync pass did for one worker.

    Attributes:
        worker_id: the worker.
        status: ``"ok"``, ``"gap"`` (waiting for a snapshot), ``"gone"``
            (cleared) or ``"unknown"`` (not registered and no epoch: skipped).
        num_applied: events applied in this pass.
        oldest_pending_unix_s: when the oldest unapplied entry's first event was
            recorded (seconds), or ``None`` when everything is applied.
    """

    worker_id: str
    status: str
    num_applied: int
    oldest_pending_unix_s: float | None


class PrefixIndex:
    """The router's reader and maintainer of the ownership index.

    Args:
        redis_url: Redis server (password and TLS in the URL).
        prefix: prefix of every key.
        sync_interval_s: seconds between sync passes of :meth:`start`'s task.
        timeout_s: per-command timeout in seconds.
        retry_after_s: after a failed lookup, lookups are skipped (answer
            ``None``) for this many seconds so requests do not wait on a dead Redis.
    """

    def __init__(
        self,
        redis_url: str,
        prefix: str,
        *,
        sync_interval_s: float = 0.02,
        timeout_s: float = 0.5,
        retry_after_s: float = 1.0,
    ) -> None:
        self._prefix = prefix
        self._interval_s = sync_interval_s
        self._retry_after_s = retry_after_s
        self._redis = connect(redis_url, timeout_s=timeout_s)
        self._sync_script = self._redis.register_script(_SYNC_LUA)
        self._lookup_script = self._redis.register_script(_LOOKUP_LUA)
        self._task: asyncio.Task[None] | None = None
        self._down_until = 0.0
        self._down = False
        #: Age of the oldest unapplied event after the last sync pass (seconds).
        self.staleness_s = 0.0
        #: Gaps seen (sync passes that asked a worker for a snapshot).
        self.num_gaps = 0

    @property
    def available(self) -> bool:
        """False while Redis is considered down (after a failed call)."""
        return not self._down

    def start(self) -> None:
        """Sync in a background task every ``sync_interval_s`` (the event loop must be running)."""
        assert self._task is None, "start() called twice"
        self._task = asyncio.create_task(self._run(), name="prefix-index-sync")

    async def close(self) -> None:
        """Stop syncing and close the connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._redis.aclose()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.sync()
            except (RedisError, OSError) as exc:
                self._mark_down(exc)

    def _mark_down(self, exc: BaseException) -> None:
        self._down_until = time.monotonic() + self._retry_after_s
        if not self._down:
            logger.warning("prefix index: Redis unreachable, routing by load only: %s", exc)
        self._down = True

    def _mark_up(self) -> None:
        if self._down:
            logger.info("prefix index: Redis reachable again, prefix-aware routing resumes")
        self._down = False
        self._down_until = 0.0

    async def sync(self, max_entries: int = 1000) -> list[SyncResult]:
        """Apply pending KV events of every publishing worker (see the module docstring).

        Args:
            max_entries: most stream entries applied per worker in this pass.

        Returns:
            One result per worker, and updates :attr:`staleness_s`.

        Raises:
            redis.exceptions.RedisError: Redis is unreachable.
        """
        rows = await self._sync_script(args=[self._prefix, max_entries])
        self._mark_up()
        now = time.time()
        results = []
        for row in rows:
            worker_id, status = (v.decode() if isinstance(v, bytes) else str(v) for v in row[:2])
            ts_ms = int(row[3])
            results.append(SyncResult(worker_id, status, int(row[2]), ts_ms / 1000 if ts_ms else None))
            if status == "gap":
                self.num_gaps += 1
                logger.info("prefix index: gap in %s's KV events, asked for a snapshot", worker_id)
        pending = [r.oldest_pending_unix_s for r in results if r.oldest_pending_unix_s is not None]
        self.staleness_s = max((max(now - t, 0.0) for t in pending), default=0.0)
        return results

    async def lookup(
        self, block_hashes: Sequence[bytes], workers: Sequence[tuple[str, int]]
    ) -> dict[str, int]:
        """How many leading blocks of a prompt each worker holds.

        Args:
            block_hashes: the prompt's chained block hashes, in order.
            workers: ``(worker_id, epoch)`` of each candidate; entries of
                other epochs do not count.

        Returns:
            ``worker_id -> number of leading blocks held``.

        Raises:
            redis.exceptions.RedisError: Redis is unreachable, or was within
                the last ``retry_after_s`` seconds (no call is made then).
        """
        if not block_hashes or not workers:
            return {w: 0 for w, _ in workers}
        if time.monotonic() < self._down_until:
            raise RedisError("prefix index: Redis marked unreachable")
        args: list[str | int] = [self._prefix, len(workers)]
        args += [w for w, _ in workers]
        args += [e for _, e in workers]
        args += [h.hex() for h in block_hashes]
        try:
            counts = await self._lookup_script(args=args)
        except (RedisError, OSError) as exc:
            self._mark_down(exc)
            raise
        self._mark_up()
        return {w: int(c) for (w, _), c in zip(workers, counts, strict=True)}


async def prefill_routing_request(
    index: PrefixIndex | None,
    request_id: str,
    prompt_token_ids: Sequence[int],
    cache_salt: str,
    candidates: Sequence[WorkerView],
) -> RoutingRequest:
    """The :class:`RoutingRequest` for picking among prefill ``candidates``.

    The prompt's block hashes are computed once, with the model id and block
    size of the first candidate's layout (workers of another layout then hold
    no matching block). With an ``index``, ``cached_blocks`` says how many
    leading blocks each candidate holds; it stays ``None`` when Redis is
    unreachable (the policy then routes by load).
    """
    routing = RoutingRequest(request_id, len(prompt_token_ids))
    if not candidates or candidates[0].info.layout.block_size < 1:
        return routing
    layout = candidates[0].info.layout
    hashes = tuple(
        hash_prompt_blocks(
            prompt_token_ids, layout.block_size, model_id=layout.model_id, cache_salt=cache_salt
        )
    )
    routing = dataclasses.replace(routing, block_hashes=hashes)
    if index is None:
        return routing
    try:
        cached = await index.lookup(hashes, [(c.worker_id, c.epoch) for c in candidates])
    except (RedisError, OSError):
        return routing
    return dataclasses.replace(routing, cached_blocks=cached)
