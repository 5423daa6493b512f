"""The open ``Decode``/``Generate`` streams of a decode worker, by the caller's request id.

A stream relays one engine request (``rid``) and its ``sampling.n`` completions.
``CancelCompletion`` ends one completion early (the router does when a stop
string ends it): the completion is marked cancelled here, and once the engine
request has its completions (:attr:`OpenStream.started`) the servicer aborts it
on the engine (``EngineCore.abort_request(rid, index)``) and ends it on the
stream with an ``"abort"`` output. A cancel that comes before then (a colocated
request still computing its prompt) waits here until the stream starts.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from engine.errors import InvalidRequest
from engine.request import EngineOutput


@dataclass(eq=False)
class OpenStream:
    """One stream's completions.

    Attributes:
        request_id: the caller's id (``DecodeRequest``/``LocalGenerateRequest.request_id``).
        rid: the engine's request id.
        n: completions of the request (``sampling.n``).
        queue: where the engine loop delivers the request's outputs.
        started: the engine request has its ``n`` completions, so one of them
            can be aborted by index (before it forks, an abort by index would
            drop the whole request).
        ended: completions whose last output the stream has yielded.
        cancelled: completions that ``CancelCompletion`` asked to end.
    """

    request_id: str
    rid: str
    n: int
    queue: asyncio.Queue[Any]
    started: bool = False
    ended: set[int] = field(default_factory=set)
    cancelled: set[int] = field(default_factory=set)

    @property
    def done(self) -> bool:
        """Every completion has had its last output."""
        return len(self.ended) == self.n

    def check_index(self, index: int) -> None:
        """Raises:
        InvalidRequest: ``index`` is not a completion of the request."""
        if index >= self.n:
            raise InvalidRequest("index", f"{index} is not below sampling.n = {self.n}")

    def needs_abort(self, index: int) -> bool:
        """Whether completion ``index`` is still running and not yet cancelled."""
        return index not in self.ended and index not in self.cancelled

    def aborted_output(self, index: int) -> EngineOutput:
        """The last output of cancelled completion ``index`` (no tokens, ``"abort"``)."""
        return EngineOutput(
            req_id=self.rid, new_token_ids=[], finished=True, finish_reason="abort", index=index
        )


class OpenStreams:
    """The worker's open streams, by ``request_id`` (the router's attempt ids are unique;
    a reused id names the latest stream)."""

    def __init__(self) -> None:
        self._streams: dict[str, OpenStream] = {}

    def open(self, request_id: str, rid: str, n: int, queue: asyncio.Queue[Any]) -> OpenStream:
        """Register a stream; call before the engine request is added."""
        stream = OpenStream(request_id, rid, n, queue)
        self._streams[request_id] = stream
        return stream

    def close(self, stream: OpenStream) -> None:
        """Forget ``stream`` (at its end, however it ended)."""
        if self._streams.get(stream.request_id) is stream:
            del self._streams[stream.request_id]

    def get(self, request_id: str) -> OpenStream | None:
        """The open stream of ``request_id``, if any."""
        return self._streams.get(request_id)

    def __len__(self) -> int:
        return len(self._streams)
