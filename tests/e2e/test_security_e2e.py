"""Security through a real stack: mutual TLS on every hop, bearer tokens on the
public API, the internal token on workers, the prompt limit, a password-protected
Redis, and no secret on a child's command line or in any log."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis

from engine.security import UNAUTHENTICATED_MESSAGE
from engine.security_config import INTERNAL_TOKEN_ENV, SecurityConfig, TlsConfig
from tandem.v1 import generation_pb2, generation_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.e2e.stack import REPO, Stack
from tests.helpers.certs import Pki, make_pki
from tests.helpers.net import free_port

pytestmark = pytest.mark.e2e

REDIS_PASSWORD = "redis-pw-5e1f"
FILE_TOKEN = "file-token-9a7c"
INLINE_TOKEN = "inline-token-41d2"
HELLO = generation_pb2.GenerateRequest(prompt="Hello", sampling=generation_pb2.SamplingParams(max_tokens=3))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def redis_with_password(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not on PATH")
    workdir = tmp_path_factory.mktemp("redis-pw")
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--requirepass", REDIS_PASSWORD, "--dir", str(workdir)]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(host="127.0.0.1", port=port, password=REDIS_PASSWORD, socket_connect_timeout=0.2)
    deadline = time.monotonic() + 10
    while True:
        try:
            if client.ping():
                break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)
    client.close()
    yield f"redis://:{REDIS_PASSWORD}@127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def stack(pki: Pki, redis_with_password: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    run_dir = tmp_path_factory.mktemp("secure")
    tokens = run_dir / "tokens.txt"
    tokens.write_text(f"# clients\n{FILE_TOKEN}\n")
    client = SecurityConfig(tls=TlsConfig(cert=pki.client_cert, key=pki.client_key, ca=pki.ca))
    args = [
        *("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-ca", str(pki.ca)),
        *("--tls-require-client-cert", "--auth-token-file", str(tokens), "--auth-token", INLINE_TOKEN),
        *("--max-prompt-tokens", "32", "--num-kv-blocks", "64"),
    ]
    model = REPO / "models" / "tandem-tiny"
    s = Stack(model, run_dir, redis_with_password, args, client=client, auth_token=FILE_TOKEN).start()
    yield s
    assert s.stop() == 0


def generate_code(channel: grpc.Channel, token: str | None) -> str:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    try:
        generation_pb2_grpc.GenerationStub(channel).Generate(HELLO, timeout=30, metadata=metadata)
    except grpc.RpcError as exc:
        assert exc.code() != grpc.StatusCode.UNAUTHENTICATED or exc.details() == UNAUTHENTICATED_MESSAGE
        return str(exc.code().name)
    return "OK"


def test_mutual_tls_and_token_reach_every_hop(stack: Stack) -> None:
    reply = stack.stub.Generate(HELLO, timeout=30)
    assert len(reply.token_ids) == 3
    router = f"127.0.0.1:{stack.port}"
    with stack.open_channel(router) as channel:
        codes = [generate_code(channel, t) for t in (None, "wrong", FILE_TOKEN, INLINE_TOKEN)]
    assert codes == ["UNAUTHENTICATED", "UNAUTHENTICATED", "OK", "OK"]


def test_clients_without_a_certificate_are_refused(stack: Stack, pki: Pki) -> None:
    router = f"127.0.0.1:{stack.port}"
    no_cert = grpc.secure_channel(router, grpc.ssl_channel_credentials(pki.ca.read_bytes()))
    rogue = grpc.secure_channel(
        router,
        grpc.ssl_channel_credentials(
            pki.ca.read_bytes(), pki.rogue_key.read_bytes(), pki.rogue_cert.read_bytes()
        ),
    )
    plaintext = grpc.insecure_channel(router)
    with no_cert, rogue, plaintext:
        assert [generate_code(c, FILE_TOKEN) for c in (no_cert, rogue, plaintext)] == ["UNAVAILABLE"] * 3


def test_workers_require_the_internal_token(stack: Stack) -> None:
    reserve = worker_pb2.ReserveRequest(request_id="direct", num_prompt_tokens=4, lease_ms=500)
    for process in stack.processes("decode"):
        for token in (None, FILE_TOKEN):
            with (
                stack.open_channel(process["grpc_address"], token) as channel,
                pytest.raises(grpc.RpcError) as info,
            ):
                worker_pb2_grpc.DecodeWorkerStub(channel).Reserve(reserve, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with stack.worker_channel(process) as channel:
            reply = worker_pb2_grpc.DecodeWorkerStub(channel).Reserve(reserve, timeout=10)
        assert len(reply.destination.block_ids) == 1
    assert stack.wait_blocks_free(timeout_s=5) == {p["id"]: 0.0 for p in stack.processes("prefill", "decode")}


def test_prompt_longer_than_the_limit_is_invalid(stack: Stack) -> None:
    long = generation_pb2.GenerateRequest(prompt_token_ids=list(range(3, 36)))
    with pytest.raises(grpc.RpcError) as info:
        stack.stub.Generate(long, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "prompt: 33 tokens, more than the 32 accepted"


def test_generate_cli_speaks_mutual_tls_with_a_token(stack: Stack, pki: Pki) -> None:
    cmd = [sys.executable, "-m", "cli.main", "generate", "Hello", "--max-tokens", "2", "--json",
           "--target", f"127.0.0.1:{stack.port}", "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert),
           "--tls-key", str(pki.client_key)]  # fmt: skip
    ok = subprocess.run(
        [*cmd, "--auth-token", FILE_TOKEN], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0, ok.stderr
    assert '"completion_tokens": 2' in ok.stdout
    denied = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert (denied.returncode, denied.stderr.strip()) == (
        1,
        f"error: UNAUTHENTICATED: {UNAUTHENTICATED_MESSAGE}",
    )


def test_secrets_stay_out_of_command_lines_and_logs(stack: Stack) -> None:
    children = [p for p in stack.cluster["processes"] if p["kind"] != "redis"]
    assert sorted(p["kind"] for p in children) == ["decode", "prefill", "router"]
    for process in children:
        cmdline = Path(f"/proc/{process['pid']}/cmdline").read_bytes().decode()
        environ = Path(f"/proc/{process['pid']}/environ").read_bytes().decode()
        assert f"{INTERNAL_TOKEN_ENV}={stack.internal_token}\0" in environ
        for secret in (stack.internal_token, FILE_TOKEN, INLINE_TOKEN, "--internal-token"):
            assert secret not in cmdline, (process["id"], secret)
    logs = [stack.log, stack.cluster_file, *sorted((stack.log.parent / "logs").glob("*.log"))]
    assert len(logs) == 5
    for path in logs:
        text = path.read_text()
        for secret in (REDIS_PASSWORD, stack.internal_token, FILE_TOKEN, INLINE_TOKEN):
            assert secret not in text, (path.name, secret)
    assert stack.cluster["redis_url"].startswith("redis://:***@127.0.0.1:")


def test_the_redis_password_is_on_no_command_line(stack: Stack) -> None:
    assert stack.proc is not None
    pids = [stack.proc.pid, *(p["pid"] for p in stack.cluster["processes"])]
    assert len(pids) >= 4  # serve, router, prefill, decode
    for pid in pids:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
        assert REDIS_PASSWORD not in cmdline, cmdline.replace("\0", " ")
