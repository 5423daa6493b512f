"""Resuming a request whose decode worker died mid-stream (``--migrate-on-failure``).

Each completion that had not finished goes on as a request of its own
(:func:`resumed`): ``n`` 1, the completion's own sampling parameters
(``SamplingParams.for_child``: its derived seed), the tokens already sent
appended to the prompt and ``max_tokens`` reduced by as many. The orchestrator
runs one such stream per completion; :func:`relay_concurrently` runs them side
by side and relays their chunks under the completion's original ``index``, so
the caller sees one seamless stream per completion. A completion that the
caller ends early (a stop string, ``CompletionCanceller.cancel``) ends by
cancelling its stream alone, which frees its blocks; closing the relay (the
caller cancelled, a deadline passed, a stream failed) cancels every stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

from router.completion_cancel import CompletionCanceller
from router.validation import ParsedRequest

if TYPE_CHECKING:
    from router.orchestrator import TokenChunk


def resumed(req: ParsedRequest, index: int, emitted: list[int]) -> ParsedRequest:
    """Completion ``index`` of ``req`` as an ``n`` = 1 request that goes on after ``emitted``
    (the tokens of that completion already sent): they join the prompt, ``max_tokens``
    shrinks by as many, and prompt log-probabilities (already sent) are not asked again.

    Greedy decoding continues with exactly the tokens the lost worker would have produced;
    seeded sampling draws new ones (token ``i`` of a seeded request depends on ``i``).
    """
    child = req.sampling.for_child(index)
    sampling = replace(child, max_tokens=child.max_tokens - len(emitted))
    return replace(req, prompt_token_ids=[*req.prompt_token_ids, *emitted], sampling=sampling)


async def relay_concurrently(
    streams: Mapping[int, AsyncGenerator[TokenChunk, None]], canceller: CompletionCanceller | None
) -> AsyncGenerator[TokenChunk, None]:
    """Run ``streams`` (completion index -> the ``n`` = 1 stream resuming it) side by side and
    yield their chunks as they come, each with its completion's ``index``,
    ``num_cached_tokens`` 0 and no prompt log-probabilities (the original prompt's were sent).

    ``canceller.cancel(index)`` cancels that completion's stream alone. Ends when every
    stream has ended (a cancelled one included). The streams do not wait for the caller:
    a slow caller leaves at most ``max_tokens`` chunks per stream queued here.

    Raises:
        Exception: the first error a stream raised; the other streams are cancelled.
    """
    queue: asyncio.Queue[TokenChunk | asyncio.Task[None]] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(_pump(index, stream, queue)) for index, stream in streams.items()]
    for index, task in zip(streams, tasks, strict=True):
        # A done callback runs even for a task cancelled before it started.
        task.add_done_callback(queue.put_nowait)
        if canceller is not None:
            canceller.redirect(index, task.cancel)
    try:
        ended = 0
        while ended < len(tasks):
            item = await queue.get()
            if not isinstance(item, asyncio.Task):
                yield item
                continue
            ended += 1
            if not item.cancelled() and (error := item.exception()) is not None:
                raise error
    finally:
        for task in tasks:
            task.cancel()  # each stream's own cleanup cancels its worker call or releases its blocks
        await asyncio.gather(*tasks, return_exceptions=True)


async def _pump(
    index: int,
    stream: AsyncGenerator[TokenChunk, None],
    queue: asyncio.Queue[TokenChunk | asyncio.Task[None]],
) -> None:
    async with contextlib.aclosing(stream) as chunks:
        async for chunk in chunks:
            queue.put_nowait(replace(chunk, index=index, num_cached_tokens=0, prompt_logprobs=None))
