"""EngineLoop: commands run on the engine thread, outputs reach asyncio queues."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

import pytest

from engine.engine_loop import EngineLoop, LoadSnapshot


@dataclass
class Out:
    req_id: str
    token: int
    finished: bool


@dataclass
class FakeCore:
    """Each step emits the next token of every active request; a request finishes after 3 tokens."""

    active: dict[str, int] = field(default_factory=dict)
    blocked: bool = False
    threads: set[str] = field(default_factory=set)
    steps: int = 0
    last_num_scheduled_tokens: int = 0

    def add(self, req_id: str) -> str:
        self.threads.add(threading.current_thread().name)
        self.active[req_id] = 0
        return req_id

    def step(self) -> list[Out]:
        self.threads.add(threading.current_thread().name)
        self.steps += 1
        if self.blocked:
            self.last_num_scheduled_tokens = 0
            return []
        self.last_num_scheduled_tokens = len(self.active)
        outs = []
        for rid in list(self.active):
            self.active[rid] += 1
            done = self.active[rid] == 3
            outs.append(Out(rid, self.active[rid], done))
            if done:
                del self.active[rid]
        return outs

    def has_unfinished_requests(self) -> bool:
        return bool(self.active)


def load(core: FakeCore) -> LoadSnapshot:
    return LoadSnapshot(num_requests_running=len(core.active))


async def collect(q: asyncio.Queue[Out]) -> list[int]:
    tokens = []
    while True:
        out = await asyncio.wait_for(q.get(), 5)
        tokens.append(out.token)
        if out.finished:
            return tokens


def test_commands_and_steps_run_on_the_engine_thread() -> None:
    async def main() -> None:
        core = FakeCore()
        loop = EngineLoop(core, load)
        loop.start()
        try:
            queues = {rid: loop.open_stream(rid) for rid in ("a", "b")}
            assert await loop.call(lambda c: c.add("a")) == "a"
            assert await loop.call(lambda c: c.add("b")) == "b"
            results = await asyncio.gather(*(collect(q) for q in queues.values()))
            assert results == [[1, 2, 3], [1, 2, 3]]
            assert core.threads == {"engine-loop"}
            assert loop.load == LoadSnapshot(num_requests_running=0)
        finally:
            loop.stop()

    asyncio.run(main())


def test_command_errors_reach_the_caller() -> None:
    async def main() -> None:
        loop = EngineLoop(FakeCore(), load)
        loop.start()
        try:
            with pytest.raises(KeyError):
                await loop.call(lambda c: c.active["missing"])
            assert await loop.call(lambda c: 41 + 1) == 42
        finally:
            loop.stop()

    asyncio.run(main())


def test_loop_does_not_spin_when_nothing_can_be_scheduled() -> None:
    async def main() -> None:
        core = FakeCore(blocked=True)
        loop = EngineLoop(core, load)
        loop.start()
        try:
            q = loop.open_stream("a")
            await loop.call(lambda c: c.add("a"))
            await asyncio.sleep(0.3)
            assert core.steps <= 3  # waits for a command instead of busy-stepping
            await loop.call(lambda c: setattr(c, "blocked", False))
            assert await collect(q) == [1, 2, 3]
        finally:
            loop.stop()

    asyncio.run(main())
