"""Option parsing: exact configs, round trips through flags, and argparse errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.main import build_parser
from cli.options import router_config_from_args, router_flags, worker_config_from_args, worker_flags
from engine.security_config import REDIS_URL_ENV, redis_url_env
from engine.worker_config import WorkerConfig
from router.config import RouterConfig


def _parse(*argv: str):  # type: ignore[no-untyped-def]
    return build_parser().parse_args(list(argv))


def test_worker_defaults_are_the_config_defaults() -> None:
    assert worker_config_from_args(_parse("prefill"), "prefill") == WorkerConfig(role="prefill")
    assert worker_config_from_args(_parse("decode"), "decode") == WorkerConfig(role="decode")


def test_every_worker_option(tmp_path: Path) -> None:
    args = _parse(
        "decode",
        *("--model", str(tmp_path), "--device", "cuda:1", "--dtype", "bfloat16"),
        *("--max-model-len", "512", "--num-kv-blocks", "100", "--kv-cache-memory-gb", "1.5"),
        *("--block-size", "32", "--host", "0.0.0.0", "--port", "7001", "--metrics-port", "7002"),
        *("--redis-url", "redis://127.0.0.1:6390/1", "--redis-prefix", "t1", "--worker-id", "d-a"),
        *("--transfer-port", "7003", "--kv-transport", "tcp", "--lease-ms", "500"),
        *("--max-num-seqs", "8", "--max-num-batched-tokens", "1024", "--max-queue-len", "10", "--seed", "3"),
        *("--load-format", "dummy", "--advertise-host", "10.1.2.3"),
    )
    assert worker_config_from_args(args, "decode") == WorkerConfig(
        role="decode",
        model=tmp_path,
        device="cuda:1",
        dtype="bfloat16",
        max_model_len=512,
        num_kv_blocks=100,
        kv_cache_memory_bytes=1_610_612_736,
        block_size=32,
        host="0.0.0.0",
        advertise_host="10.1.2.3",
        port=7001,
        metrics_port=7002,
        redis_url="redis://127.0.0.1:6390/1",
        redis_prefix="t1",
        worker_id="d-a",
        kv_transport="tcp",
        transfer_port=7003,
        lease_ms=500,
        max_num_seqs=8,
        max_num_batched_tokens=1024,
        max_queue_len=10,
        seed=3,
        load_format="dummy",
    )


def test_router_defaults_and_options(tmp_path: Path) -> None:
    assert router_config_from_args(_parse("router")) == RouterConfig()
    args = _parse(
        "router",
        *("--model", str(tmp_path), "--max-model-len", "256", "--host", "::1", "--port", "6000"),
        *("--metrics-port", "6001", "--redis-url", "unix:///tmp/r.sock", "--redis-prefix", "x"),
        *("--routing", "round-robin", "--max-queue-len", "7", "--lease-ms", "900"),
    )
    assert router_config_from_args(args) == RouterConfig(
        model=tmp_path,
        host="::1",
        port=6000,
        metrics_port=6001,
        redis_url="unix:///tmp/r.sock",
        redis_prefix="x",
        max_model_len=256,
        routing="round-robin",
        max_queue_len=7,
        lease_ms=900,
    )


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_worker_flags_parse_back_to_the_config(tmp_path: Path, role: str) -> None:
    config = WorkerConfig(
        role=role,  # type: ignore[arg-type]
        model=tmp_path,
        max_model_len=96,
        num_kv_blocks=33,
        kv_cache_memory_bytes=123_456_789,
        block_size=8,
        port=1,
        metrics_port=2,
        worker_id=f"{role}-3",
        host="0.0.0.0",
        advertise_host="fd00::7",
        transfer_port=4 if role == "decode" else 0,
        max_queue_len=5,
        load_format="dummy",
        kernels="torch",
        enforce_eager=True,
    )
    assert worker_config_from_args(_parse(role, *worker_flags(config)), role) == config  # type: ignore[arg-type]


def test_router_flags_parse_back_to_the_config(tmp_path: Path) -> None:
    config = RouterConfig(
        model=tmp_path, port=9, metrics_port=10, max_model_len=64, max_queue_len=3, lease_ms=4
    )
    assert router_config_from_args(_parse("router", *router_flags(config))) == config


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["prefill", "--block-size", "12"],
            "argument --block-size: must be a positive power of two, got '12'",
        ),
        (["prefill", "--block-size", "0"], "argument --block-size: must be a positive integer, got '0'"),
        (["decode", "--port", "70000"], "argument --port: must be a port in [0, 65535], got '70000'"),
        (["decode", "--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
        (["decode", "--device", "tpu"], "argument --device: must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        (["decode", "--max-model-len", "x"], "argument --max-model-len: must be an integer, got 'x'"),
        (["decode", "--kv-cache-memory-gb", "-1"], "argument --kv-cache-memory-gb: must be a number > 0"),
        (
            ["decode", "--model", "/no/such/dir"],
            "argument --model: model directory not found: '/no/such/dir'",
        ),
        (
            ["router", "--redis-url", "http://x"],
            "argument --redis-url: must be a redis://, rediss:// or unix://",
        ),
        (["router", "--routing", "random"], "argument --routing: invalid choice: 'random'"),
        (
            ["serve", "--prefill-workers", "0"],
            "argument --prefill-workers: must be a positive integer, got '0'",
        ),
        (
            ["serve", "--startup-timeout", "nan"],
            "argument --startup-timeout: must be a number > 0, got 'nan'",
        ),
        (["generate", "hi", "--top-p", "1.5"], "argument --top-p: must be in (0, 1], got '1.5'"),
        (
            ["generate", "hi", "--temperature", "-1"],
            "argument --temperature: must be a number >= 0, got '-1'",
        ),
        (["generate"], "the following arguments are required: prompt"),
    ],
)
def test_bad_values_exit_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _parse(*argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_redis_password_travels_in_the_environment_not_in_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = "redis://:s3cret@10.0.0.1:6380/2"
    router = RouterConfig(model=tmp_path, redis_url=url)
    decode = WorkerConfig(role="decode", model=tmp_path, redis_url=url)
    router_argv, decode_argv = router_flags(router), worker_flags(decode)
    assert not any("s3cret" in flag for flag in [*router_argv, *decode_argv])
    assert redis_url_env(url) == {REDIS_URL_ENV: url}
    monkeypatch.setenv(REDIS_URL_ENV, url)
    assert router_config_from_args(_parse("router", *router_argv)) == router
    assert worker_config_from_args(_parse("decode", *decode_argv), "decode") == decode


def test_a_redis_url_without_a_password_stays_a_flag(tmp_path: Path) -> None:
    url = "redis://10.0.0.1:6380/2"
    assert redis_url_env(url) == {}
    assert ["--redis-url", url] == [
        f
        for f in worker_flags(WorkerConfig(role="decode", model=tmp_path, redis_url=url))
        if f in ("--redis-url", url)
    ]


@pytest.mark.parametrize(
    ("host", "advertise", "bound", "registered"),
    [
        ("0.0.0.0", "10.0.0.7", "0.0.0.0:7001", "10.0.0.7:7001"),
        ("127.0.0.1", None, "127.0.0.1:7001", "127.0.0.1:7001"),
        ("127.0.0.1", "127.0.0.1", "127.0.0.1:7001", "127.0.0.1:7001"),
        ("::", "fd00::7", "[::]:7001", "[fd00::7]:7001"),
        ("::", "fd00::7", ":::7001", "[fd00::7]:7001"),
        ("0.0.0.0", "node-3.example", "0.0.0.0:7001", "node-3.example:7001"),
        ("0.0.0.0", "10.0.0.7", "loopback:3", "loopback:3"),  # not a host:port on the bound host
    ],
)
def test_advertised_address_replaces_the_bound_host(
    host: str, advertise: str | None, bound: str, registered: str
) -> None:
    config = WorkerConfig(role="decode", host=host, advertise_host=advertise)
    assert config.advertised(bound) == registered
