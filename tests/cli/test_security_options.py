"""Security options: parsing, secrets from the environment, and flags without secrets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cli.main import build_parser
from cli.options import router_config_from_args, router_flags, worker_config_from_args, worker_flags
from cli.security_options import cluster_security, security_config_from_args
from engine.security_config import AUTH_TOKENS_ENV, INTERNAL_TOKEN_ENV, SecurityConfig, TlsConfig


@pytest.fixture
def pem_files(tmp_path: Path) -> dict[str, Path]:
    files = {name: tmp_path / f"{name}.pem" for name in ("cert", "key", "ca")}
    for path in files.values():
        path.write_text("-----BEGIN TEST-----\n")
    return files


def test_router_flags_round_trip_without_secrets(pem_files: dict[str, Path], tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("t-file\n")
    argv = ["router", "--tls-cert", str(pem_files["cert"]), "--tls-key", str(pem_files["key"]),
            "--tls-ca", str(pem_files["ca"]), "--tls-require-client-cert", "--auth-token", "t-inline",
            "--auth-token-file", str(tokens), "--internal-token", "i-1", "--max-message-bytes", "4096",
            "--max-prompt-tokens", "100", "--drain-timeout-s", "7.5"]  # fmt: skip
    config = router_config_from_args(build_parser().parse_args(argv))
    assert config.security == SecurityConfig(
        tls=TlsConfig(pem_files["cert"], pem_files["key"], pem_files["ca"], require_client_cert=True),
        auth_tokens=("t-inline", "t-file"),
        internal_token="i-1",
        max_message_bytes=4096,
    )
    assert (config.max_prompt_tokens, config.drain_timeout_s) == (100, 7.5)
    flags = router_flags(config)
    assert not {"t-inline", "t-file", "i-1", "--auth-token", "--internal-token"} & set(flags)
    again = router_config_from_args(build_parser().parse_args(["router", *flags]))
    # The secrets come back through the environment only (see test_secrets_come_from_the_environment).
    secretless = dataclasses.replace(config.security, auth_tokens=(), internal_token=None)
    assert again == dataclasses.replace(config, security=secretless)


def test_worker_flags_keep_defaults_out() -> None:
    config = worker_config_from_args(build_parser().parse_args(["decode"]), "decode")
    assert config.security == SecurityConfig() and config.drain_timeout_s == 30.0
    flags = worker_flags(config)
    assert "--max-message-bytes" not in flags and "--drain-timeout-s" not in flags


def test_secrets_come_from_the_environment() -> None:
    args = build_parser().parse_args(["router"])
    env = {INTERNAL_TOKEN_ENV: "from-env", AUTH_TOKENS_ENV: "a\nb\n"}
    security = security_config_from_args(args, public=True, env=env)
    assert (security.internal_token, security.auth_tokens) == ("from-env", ("a", "b"))
    worker = security_config_from_args(build_parser().parse_args(["prefill"]), public=False, env=env)
    assert (worker.internal_token, worker.auth_tokens) == ("from-env", ())


def test_serve_makes_an_internal_token_per_run_unless_given() -> None:
    args = build_parser().parse_args(["serve"])
    first, second = cluster_security(args, env={}), cluster_security(args, env={})
    assert first.internal_token and second.internal_token and first.internal_token != second.internal_token
    assert len(first.internal_token) >= 32
    assert cluster_security(args, env={INTERNAL_TOKEN_ENV: "fixed"}).internal_token == "fixed"


def test_half_tls_configuration_exits_with_status_2(pem_files: dict[str, Path]) -> None:
    args = build_parser().parse_args(["router", "--tls-cert", str(pem_files["cert"])])
    with pytest.raises(SystemExit) as info:
        router_config_from_args(args)
    assert info.value.code == 2


def test_clients_take_tls_and_a_token(pem_files: dict[str, Path]) -> None:
    security = ["--tls-ca", str(pem_files["ca"]), "--auth-token", "tok"]
    for argv in (["generate", "hi"], ["bench", "--concurrency", "1", "--num-requests", "1"]):
        args = build_parser().parse_args([*argv, *security])
        assert (args.tls_ca, args.auth_token) == (pem_files["ca"], "tok")
