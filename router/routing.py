"""Routing policies: which prefill or decode worker gets a request (torch-free).

A policy sees a snapshot of the healthy workers of one role
(:class:`WorkerView`, built by ``router.worker_pool.WorkerPool.healthy``) and
returns one of them. Policies are looked up by name in a registry
(:func:`get_policy`); add one with :func:`register_policy`.

The same policy object serves both roles: it scores a candidate by its role
(all candidates of one call share a role). The router counts the requests it
has sent and not yet seen finish (``inflight``, ``inflight_tokens``) in each
view, so load it assigned counts at once, before the next heartbeat, and a
burst spreads over the workers.

The ``prefix`` policy (the router's default) also weighs how much of the
prompt each prefill worker already holds in its prefix cache
(``RoutingRequest.cached_blocks``, read from the Redis ownership index by
``router/prefix_index.py``); without that information it routes by load.
Every policy names the reason of each decision (:meth:`RoutingPolicy.reason`)
for ``tandem_routing_decisions_total{policy,reason}``.
"""

from __future__ import annotations

import abc
import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.errors import WorkerUnavailable
from tandem.v1 import worker_pb2

PREFILL = worker_pb2.WORKER_ROLE_PREFILL
DECODE = worker_pb2.WORKER_ROLE_DECODE
COLOCATED = worker_pb2.WORKER_ROLE_COLOCATED


@dataclass(frozen=True)
class WorkerView:
    """A worker as the router sees it at one moment.

    Attributes:
        worker_id: stable id of the worker.
        epoch: incarnation number of the worker.
        role: ``WorkerRole`` value (prefill or decode).
        grpc_address: ``host:port`` of its gRPC server.
        info: its last registration (load fields as of the last heartbeat).
        inflight: requests the router sent to it that have not finished.
        inflight_tokens: prompt tokens of those requests.
    """

    worker_id: str
    epoch: int
    role: int
    grpc_address: str
    info: worker_pb2.WorkerInfo
    inflight: int = 0
    inflight_tokens: int = 0


@dataclass(frozen=True)
class RoutingRequest:
    """What a policy may know of a request.

    Attributes:
        request_id: the request's id.
        num_prompt_tokens: prompt length in tokens.
        block_hashes: chained hashes of the prompt's full blocks, in order
            (``engine.hashing.hash_prompt_blocks``; empty when unknown).
        cached_blocks: ``worker_id -> leading prompt blocks it holds`` for the
            prefill candidates, from the ownership index; ``None`` when the
            index was not consulted or is unreachable.
    """

    request_id: str
    num_prompt_tokens: int
    block_hashes: tuple[bytes, ...] = field(default=())
    cached_blocks: Mapping[str, int] | None = None


class RoutingPolicy(abc.ABC):
    """Chooses one worker among candidates of one role."""

    #: Name the policy is registered under (set by :func:`register_policy`).
    name: str = ""
    #: Whether the router should fill ``RoutingRequest.cached_blocks`` for prefill picks.
    uses_prefix_index: bool = False

    def reason(self, chosen: WorkerView, request: RoutingRequest) -> str:
        """Why ``chosen`` was picked for ``request`` (a metric label)."""
        return "load"

    def pick(self, candidates: Sequence[WorkerView], request: RoutingRequest) -> WorkerView:
        """The worker that should serve ``request``.

        Args:
            candidates: healthy workers, all of the same role.
            request: the request to place.

        Raises:
            WorkerUnavailable: ``candidates`` is empty.
            ValueError: ``candidates`` mix roles, or the policy cannot score their role.
        """
        if not candidates:
            raise WorkerUnavailable(f"no healthy worker for request {request.request_id}")
        roles = {c.role for c in candidates}
        if len(roles) != 1:
            raise ValueError(f"candidates mix roles {sorted(roles)}")
        return self._pick(candidates, request)

    @abc.abstractmethod
    def _pick(self, candidates: Sequence[WorkerView], request: RoutingRequest) -> WorkerView:
        """Choose among non-empty ``candidates`` of one role."""


_POLICIES: dict[str, type[RoutingPolicy]] = {}


def register_policy(name: str) -> Callable[[type[RoutingPolicy]], type[RoutingPolicy]]:
    """Class decorator that registers a policy under ``name``."""

    def register(cls: type[RoutingPolicy]) -> type[RoutingPolicy]:
        assert name not in _POLICIES, f"routing policy {name!r} registered twice"
        cls.name = name
        _POLICIES[name] = cls
        return cls

    return register


def policy_names() -> list[str]:
    """Names of the registered policies, sorted."""
    return sorted(_POLICIES)


def get_policy(name: str) -> RoutingPolicy:
    """A new instance of the policy registered as ``name``.

    Raises:
        ValueError: unknown name (the message lists the choices).
    """
    try:
        cls = _POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {policy_names()}") from None
    return cls()


def reserved_blocks(view: WorkerView) -> int:
    """Blocks the router's in-flight requests will take on ``view``'s worker.

    ``ceil(inflight_tokens / block_size)``, with ``block_size`` from the
    worker's layout (1 when the layout is unset, i.e. one block per token).
    """
    block_size = view.info.layout.block_size or 1
    return math.ceil(view.inflight_tokens / block_size)


def _prefill_key(view: WorkerView) -> tuple[Any, ...]:
    """Fewest tokens queued (worker's waiting + router's in flight), then fewest in flight, then id."""
    return (view.info.num_tokens_waiting + view.inflight_tokens, view.inflight, view.worker_id)


def _decode_key(view: WorkerView) -> tuple[Any, ...]:
    """Most free blocks after in-flight reservations, then fewest running, then id."""
    free = view.info.num_kv_blocks_free - reserved_blocks(view)
    running = view.info.num_requests_running + view.inflight
    return (-free, running, view.worker_id)


_LOAD_KEYS: dict[int, Callable[[WorkerView], tuple[Any, ...]]] = {
    PREFILL: _prefill_key,
    DECODE: _decode_key,
    COLOCATED: _decode_key,  # holds its requests' KV for their whole life, like a decode worker
}


@register_policy("least-loaded")
class LeastLoaded(RoutingPolicy):
    """Least-loaded worker, scored by role.

    Prefill: fewest ``num_tokens_waiting + inflight_tokens``; ties go to fewest
    ``inflight``, then the smallest worker id.
    Decode: most ``num_kv_blocks_free - reserved_blocks(view)``; ties go to
    fewest ``num_requests_running + inflight``, then the smallest worker id.

    Until the next heartbeat a request may be counted twice (in the worker's
    reported load and in the router's in-flight count); this errs toward
    spreading load.
    """

    def _pick(self, candidates: Sequence[WorkerView], request: RoutingRequest) -> WorkerView:
        key = _LOAD_KEYS.get(candidates[0].role)
        if key is None:
            raise ValueError(
                f"least-loaded scores prefill and decode workers only, not role {candidates[0].role}"
            )
        return min(candidates, key=key)


@register_policy("round-robin")
class RoundRobin(RoutingPolicy):
    """Cycles through the candidates in worker-id order, one cursor per role."""

    def __init__(self) -> None:
        self._cursors: dict[int, int] = {}

    def _pick(self, candidates: Sequence[WorkerView], request: RoutingRequest) -> WorkerView:
        role = candidates[0].role
        cursor = self._cursors.get(role, 0)
        self._cursors[role] = cursor + 1
        ordered = sorted(candidates, key=lambda v: v.worker_id)
        return ordered[cursor % len(ordered)]

    def reason(self, chosen: WorkerView, request: RoutingRequest) -> str:
        return "cycle"


def cached_tokens(view: WorkerView, request: RoutingRequest) -> int:
    """Prompt tokens ``view``'s worker holds in its prefix cache, per the index (0 when unknown)."""
    if request.cached_blocks is None:
        return 0
    return min(
        request.cached_blocks.get(view.worker_id, 0) * view.info.layout.block_size, request.num_prompt_tokens
    )


def rendezvous_rank(view: WorkerView, request: RoutingRequest) -> bytes:
    """Tie-break: highest-random-weight hashing of the prompt's first block over worker ids.

    Prompts that start alike rank the workers alike, so ties (no cached
    prefix anywhere, equal load) send them to the same worker, which then
    caches the prefix for the next ones. (Rendezvous hashing: Thaler and
    Ravishankar, 1996.)
    """
    first = request.block_hashes[0] if request.block_hashes else request.request_id.encode()
    return hashlib.sha256(first + view.worker_id.encode()).digest()


@register_policy("prefix")
class PrefixAware(RoutingPolicy):
    """Prefill: least ``uncached prompt tokens + load_weight x queued tokens``; decode as least-loaded.

    ``uncached`` is ``num_prompt_tokens - cached_tokens(view, request)``;
    queued tokens are the tokens to compute of the prefills the router has sent
    the worker and not seen return (``inflight_tokens``, counted at once, so a
    burst spreads). The heartbeat's ``num_tokens_waiting`` is left out: it lags
    by up to a heartbeat interval, so a request that just finished would
    outweigh a long cached prefix (with several routers, each sees only its own
    prefills). Ties go to :func:`rendezvous_rank`, then the smaller worker id.
    With ``cached_blocks`` unknown (index unreachable) every worker's cached
    count is 0, which is least-loaded routing.
    """

    uses_prefix_index = True
    #: Weight of one queued token against one token to compute.
    load_weight: float = 1.0

    def _pick(self, candidates: Sequence[WorkerView], request: RoutingRequest) -> WorkerView:
        if candidates[0].role != PREFILL:
            return LeastLoaded()._pick(candidates, request)

        def cost(view: WorkerView) -> tuple[float, bytes, str]:
            queued = view.inflight_tokens
            uncached = request.num_prompt_tokens - cached_tokens(view, request)
            return (uncached + self.load_weight * queued, rendezvous_rank(view, request), view.worker_id)

        return min(candidates, key=cost)

    def reason(self, chosen: WorkerView, request: RoutingRequest) -> str:
        if chosen.role != PREFILL:
            return "load"
        if request.cached_blocks is None:
            return "index-unavailable"
        return "prefix-hit" if cached_tokens(chosen, request) > 0 else "no-prefix-hit"
