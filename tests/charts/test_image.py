"""The Dockerfile and .dockerignore (no container engine here: structure and the health probe).

The HEALTHCHECK command is taken from the Dockerfile and run against a real gRPC health
server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
from pathlib import Path

from engine.security import server_credentials
from engine.security_config import TlsConfig
from engine.serving import GrpcProcess
from tests.helpers.certs import Pki, make_pki

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions(name: str) -> list[str]:
    """Arguments of every ``name`` instruction (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [line.split(None, 1)[1] for line in text.splitlines() if line.split(None, 1)[:1] == [name]]


def test_multi_stage_with_cuda_and_cpu_variants() -> None:
    stages = instructions("FROM")
    assert stages == [
        "${CUDA_BASE} AS base-cuda",
        "${CPU_BASE} AS base-cpu",
        "base-${VARIANT} AS base",
        "base AS builder",
        "base AS runtime",
    ]
    args = instructions("ARG")
    assert "VARIANT=cuda" in args
    assert any(a.startswith("CUDA_BASE=nvidia/cuda:") and "runtime" in a for a in args)


def test_runtime_is_non_root_with_tandem_entrypoint() -> None:
    assert instructions("USER") == ["10001:10001"]
    assert instructions("ENTRYPOINT") == ['["tandem"]']
    copies = instructions("COPY")
    assert "--from=builder /opt/venv /opt/venv" in copies
    # Matches the chart's model.bundledDir default.
    assert "--from=builder /opt/tandem/app /opt/tandem/app" in copies
    assert "/opt/tandem/app/models/tandem-tiny" in (ROOT / "charts/tandem/values.yaml").read_text()


def test_dockerignore_keeps_the_sources_and_drops_local_state() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert {".git", ".venv", "**/__pycache__", "tests", "charts"} <= ignored
    for kept in ("models", "proto", "engine", "router", "cli", "pyproject.toml", "README.md"):
        assert kept not in ignored


def healthcheck_argv() -> list[str]:
    (healthcheck,) = instructions("HEALTHCHECK")
    command = healthcheck.split(" CMD ", 1)[1]
    argv = shlex.split(command)
    assert argv[:2] == ["python3", "-c"]
    return [sys.executable, *argv[1:]]


async def _probe(target: str, tls_env: dict[str, str] | None = None) -> int:
    env = {**os.environ, "TANDEM_HEALTH_TARGET": target, **(tls_env or {})}
    proc = await asyncio.create_subprocess_exec(
        *healthcheck_argv(), env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    return await asyncio.wait_for(proc.wait(), timeout=20)


async def _probe_server() -> tuple[int, int, int]:
    process = GrpcProcess("127.0.0.1", 0, [], lambda server: None)
    await process.start()
    target = process.address
    try:
        not_serving = await _probe(target)
        await process.set_serving()
        serving = await _probe(target)
    finally:
        process.request_stop()
        await process.wait_for_termination()
    refused = await _probe(target)
    return not_serving, serving, refused


def test_healthcheck_exits_zero_only_when_serving() -> None:
    assert asyncio.run(_probe_server()) == (1, 0, 1)


async def _probe_tls_server(pki: Pki) -> tuple[int, int, int, int]:
    tls = TlsConfig(cert=pki.server_cert, key=pki.server_key, ca=pki.ca, require_client_cert=True)
    process = GrpcProcess("127.0.0.1", 0, [], lambda server: None, credentials=server_credentials(tls))
    await process.start()
    await process.set_serving()
    target = process.address
    ca = {"TANDEM_HEALTH_TLS_CA": str(pki.ca)}
    client = {"TANDEM_HEALTH_TLS_CERT": str(pki.client_cert), "TANDEM_HEALTH_TLS_KEY": str(pki.client_key)}
    rogue = {"TANDEM_HEALTH_TLS_CERT": str(pki.rogue_cert), "TANDEM_HEALTH_TLS_KEY": str(pki.rogue_key)}
    try:
        return (
            await _probe(target, {**ca, **client}),
            await _probe(target),  # plaintext
            await _probe(target, ca),  # no client certificate
            await _probe(target, {**ca, **rogue}),
        )
    finally:
        process.request_stop()
        await process.wait_for_termination()


def test_healthcheck_dials_mutual_tls_with_the_configured_certificates(tmp_path: Path) -> None:
    assert asyncio.run(_probe_tls_server(make_pki(tmp_path))) == (0, 1, 1, 1)
