"""``tandem serve`` with fake components: tiny grpc.aio servers that only answer health checks."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cli import serve
from cli.main import build_parser
from tests.helpers.net import free_port

# A stand-in for `python -m cli.main <kind> ...`: serves grpc.health.v1 on --host:--port.
# Extra flags: --fail (exit 3 at once, or once the file --fail-when names exists),
# --exit-after S (exit 5 after S s), --never-serving.
FAKE_COMPONENT = """
import argparse, asyncio, os, signal, sys, time
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

parser = argparse.ArgumentParser()
parser.add_argument("kind")
parser.add_argument("--host")
parser.add_argument("--port", type=int)
parser.add_argument("--fail", action="store_true")
parser.add_argument("--fail-when")
parser.add_argument("--exit-after", type=float)
parser.add_argument("--never-serving", action="store_true")
args, _ = parser.parse_known_args()
print("pid", os.getpid(), flush=True)
print("argv", " ".join(sys.argv[1:]), flush=True)
if args.fail:
    deadline = time.monotonic() + 30
    while args.fail_when and not os.path.exists(args.fail_when) and time.monotonic() < deadline:
        time.sleep(0.01)
    print(f"fake {args.kind}: cannot load model", file=sys.stderr, flush=True)
    sys.exit(3)

async def main():
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"{args.host}:{args.port}")
    await server.start()
    status = "NOT_SERVING" if args.never_serving else "SERVING"
    await servicer.set("", getattr(health_pb2.HealthCheckResponse, status))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), args.exit_after)
    except asyncio.TimeoutError:
        sys.exit(5)
    print("sigterm", time.time_ns(), flush=True)
    await server.stop(None)
    print("exit", time.time_ns(), flush=True)

asyncio.run(main())
"""

DRIVER = """
import sys
from cli import serve
from cli.main import build_parser

script, argv = sys.argv[1], sys.argv[2:]
args = build_parser().parse_args(["serve", *argv])
sys.exit(serve.run(args, command_builder=lambda kind, flags: [sys.executable, script, kind, *flags]))
"""


@pytest.fixture
def fake_component(tmp_path: Path) -> Path:
    path = tmp_path / "fake_component.py"
    path.write_text(FAKE_COMPONENT)
    return path


def _serve_args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    return build_parser().parse_args(
        ["serve", "--port", str(free_port()), "--run-dir", str(tmp_path / "run"), *extra]
    )


def _log_value(log: Path, key: str) -> str:
    return next(line.split(" ", 1)[1] for line in log.read_text().splitlines() if line.startswith(f"{key} "))


def _assert_gone(pid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status)


def test_plan_gives_exact_child_command_lines(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["serve", "--model", str(tmp_path), "--decode-workers", "2", "--block-size", "8", "--seed", "1"]
    )
    ports = iter(range(41000, 41100))
    specs = serve.plan_cluster(args, "redis://127.0.0.1:7000/0", pick_port=lambda _host: next(ports))
    assert [(s.kind, s.id, s.port, s.metrics_port, s.transfer_port) for s in specs] == [
        ("prefill", "prefill-0", 41000, 41001, None),
        ("decode", "decode-0", 41002, 41003, 41004),
        ("decode", "decode-1", 41005, 41006, 41007),
        ("router", "router", 50051, 41008, None),
    ]
    common = [
        *("--model", str(tmp_path), "--device", "auto", "--dtype", "auto", "--kv-cache-memory-gb", "0.25"),
        *("--block-size", "8", "--host", "127.0.0.1"),
    ]
    scheduler = [
        *("--redis-url", "redis://127.0.0.1:7000/0", "--redis-prefix", "tandem", "--kv-transport", "auto"),
        *("--kv-transfer-layers-per-message", "8"),
        *("--lease-ms", "30000", "--max-num-seqs", "64", "--max-num-batched-tokens", "2048"),
        *("--max-queue-len", "256", "--seed", "1", "--load-format", "auto", "--kernels", "auto"),
    ]
    python = [sys.executable, "-m", "cli.main"]
    assert specs[0].argv == (
        *python, "prefill", *common, "--port", "41000", "--metrics-port", "41001", *scheduler,
        "--worker-id", "prefill-0",
    )  # fmt: skip
    assert specs[2].argv == (
        *python, "decode", *common, "--port", "41005", "--metrics-port", "41006", *scheduler,
        "--worker-id", "decode-1", "--transfer-port", "41007",
    )  # fmt: skip
    assert specs[3].argv == (
        *python, "router", "--model", str(tmp_path), "--host", "127.0.0.1", "--port", "50051",
        "--metrics-port", "41008", "--redis-url", "redis://127.0.0.1:7000/0", "--redis-prefix", "tandem",
        "--routing", "prefix", "--max-queue-len", "1024", "--lease-ms", "30000",
    )  # fmt: skip


def test_plan_picks_router_ports_given_as_0() -> None:
    args = build_parser().parse_args(["serve", "--port", "0", "--metrics-port", "0"])
    ports = iter([41000, 41000, 41001, 41002, 41003, 41004, 41005, 41006])
    specs = serve.plan_cluster(args, "redis://127.0.0.1:7000/0", pick_port=lambda _host: next(ports))
    assert [(s.id, s.port, s.metrics_port, s.transfer_port) for s in specs] == [
        ("prefill-0", 41000, 41001, None),
        ("decode-0", 41002, 41003, 41004),
        ("router", 41005, 41006, None),
    ]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_cluster_file_then_signal_stops_everything(
    tmp_path: Path, fake_component: Path, signum: signal.Signals
) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cluster_file = tmp_path / "cluster.json"
    router_port = free_port()
    argv = [
        *(sys.executable, str(driver), str(fake_component), "--port", str(router_port)),
        *("--decode-workers", "2", "--cluster-file", str(cluster_file), "--run-dir", str(tmp_path / "run")),
        *("--startup-timeout", "30"),
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not cluster_file.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no cluster file after 30 s"
            time.sleep(0.05)
        cluster = json.loads(cluster_file.read_text())
        processes = cluster["processes"]
        assert [p["kind"] for p in processes] == ["redis", "router", "prefill", "decode", "decode"]
        assert [p["id"] for p in processes] == ["redis", "router", "prefill-0", "decode-0", "decode-1"]
        assert cluster["router"] == processes[1]
        assert processes[1]["grpc_address"] == f"127.0.0.1:{router_port}"
        assert processes[0]["grpc_address"] is None
        assert cluster["redis_url"].startswith("redis://127.0.0.1:")
        assert [p["transfer_address"] is not None for p in processes] == [False, False, False, True, True]
        ports = [
            int(p[key].rsplit(":", 1)[1])
            for p in processes[1:]
            for key in ("grpc_address", "metrics_address")
        ]
        assert len(set(ports)) == len(ports)
        for process in processes:
            os.kill(process["pid"], 0)  # alive
            assert Path(process["log"]).is_file()
        for process in processes[1:]:
            assert _health(process["grpc_address"]) == health_pb2.HealthCheckResponse.SERVING
            assert _log_value(Path(process["log"]), "pid") == str(process["pid"])
        decode_1_argv = _log_value(Path(processes[4]["log"]), "argv").split()
        assert decode_1_argv[decode_1_argv.index("--worker-id") + 1] == "decode-1"
        assert decode_1_argv[decode_1_argv.index("--redis-url") + 1] == cluster["redis_url"]

        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert "Tandem cluster" in stdout
    assert not cluster_file.exists()
    for process in processes:
        _assert_gone(process["pid"])
    router_exit = int(_log_value(Path(processes[1]["log"]), "exit"))
    for worker in processes[2:]:
        assert int(_log_value(Path(worker["log"]), "sigterm")) > router_exit


def test_a_child_that_exits_during_startup_fails_with_its_log(
    tmp_path: Path, fake_component: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster_file = tmp_path / "cluster.json"
    args = _serve_args(tmp_path, "--redis-url", "redis://127.0.0.1:1/0", "--cluster-file", str(cluster_file))

    go = tmp_path / "go"

    def command(kind: str, flags: list[str]) -> list[str]:
        fail = ["--fail", "--fail-when", str(go)] if kind == "prefill" else []
        return [sys.executable, str(fake_component), kind, *flags, *fail]

    def fail_once_the_others_run() -> None:  # so that their logs name their pids
        logs = [tmp_path / "run" / f"{name}.log" for name in ("decode-0", "router")]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(
            log.exists() and "pid " in log.read_text() for log in logs
        ):
            time.sleep(0.01)
        go.touch()

    threading.Thread(target=fail_once_the_others_run, daemon=True).start()
    assert serve.run(args, command_builder=command) == 1
    err = capsys.readouterr().err
    assert "tandem serve: prefill-0 (pid " in err
    assert "exited with code 3; last lines of" in err
    assert "fake prefill: cannot load model" in err
    assert not cluster_file.exists()
    for name in ("decode-0", "router"):
        _assert_gone(int(_log_value(tmp_path / "run" / f"{name}.log", "pid")))


def test_a_child_that_dies_while_serving_stops_the_cluster(
    tmp_path: Path, fake_component: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster_file = tmp_path / "cluster.json"
    args = _serve_args(tmp_path, "--redis-url", "redis://127.0.0.1:1/0", "--cluster-file", str(cluster_file))

    def command(kind: str, flags: list[str]) -> list[str]:
        extra = ["--exit-after", "2"] if kind == "decode" else []
        return [sys.executable, str(fake_component), kind, *flags, *extra]

    assert serve.run(args, command_builder=command) == 1
    captured = capsys.readouterr()
    assert "Tandem cluster" in captured.out  # it was serving before decode-0 died
    assert "tandem serve: decode-0 (pid " in captured.err
    assert "exited with code 5" in captured.err
    assert not cluster_file.exists()
    for name in ("prefill-0", "router"):
        log = tmp_path / "run" / f"{name}.log"
        assert _log_value(log, "exit")  # stopped cleanly by SIGTERM
        _assert_gone(int(_log_value(log, "pid")))


def test_startup_timeout(tmp_path: Path, fake_component: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _serve_args(tmp_path, "--redis-url", "redis://127.0.0.1:1/0", "--startup-timeout", "3")

    def command(kind: str, flags: list[str]) -> list[str]:
        extra = ["--never-serving"] if kind == "router" else []
        return [sys.executable, str(fake_component), kind, *flags, *extra]

    assert serve.run(args, command_builder=command) == 1
    err = capsys.readouterr().err
    router_pid = _log_value(tmp_path / "run" / "router.log", "pid")
    assert f"tandem serve: not SERVING within 3 s: router (pid {router_pid}) on 127.0.0.1:{args.port};" in err
    assert "--never-serving" in err  # the log's tail


def test_workers_are_spread_round_robin_over_gpus() -> None:
    from cli.serve import worker_devices

    assert worker_devices("cuda", lambda: 2) == ["cuda:0", "cuda:1"]
    assert worker_devices("auto", lambda: 3) == ["cuda:0", "cuda:1", "cuda:2"]
    assert worker_devices("cuda", lambda: 1) == ["cuda"]
    assert worker_devices("auto", lambda: 0) == ["auto"]
    assert worker_devices("cpu", lambda: 8) == ["cpu"]
    assert worker_devices("cuda:1", lambda: 8) == ["cuda:1"]


def test_a_drained_worker_leaves_the_others_serving_until_the_last_of_its_kind(
    tmp_path: Path, fake_component: Path
) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cluster_file = tmp_path / "cluster.json"
    argv = [
        *(sys.executable, str(driver), str(fake_component), "--port", str(free_port())),
        *("--decode-workers", "2", "--cluster-file", str(cluster_file), "--run-dir", str(tmp_path / "run")),
        *("--redis-url", "redis://127.0.0.1:1/0", "--startup-timeout", "30"),
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not cluster_file.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no cluster file after 30 s"
            time.sleep(0.05)
        by_id = {p["id"]: p for p in json.loads(cluster_file.read_text())["processes"]}
        os.kill(by_id["decode-0"]["pid"], signal.SIGTERM)  # the fake exits 0, like a drained worker
        deadline = time.monotonic() + 10
        while "decode-0" in {p["id"] for p in json.loads(cluster_file.read_text())["processes"]}:
            assert time.monotonic() < deadline, "decode-0 still in the cluster file"
            time.sleep(0.05)
        time.sleep(1.0)  # serve polls every 0.2 s: it would have stopped by now
        assert proc.poll() is None
        for name in ("router", "prefill-0", "decode-1"):
            assert _health(by_id[name]["grpc_address"]) == health_pb2.HealthCheckResponse.SERVING
        os.kill(by_id["decode-1"]["pid"], signal.SIGTERM)  # the last decode worker
        _stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, stderr
    assert (
        "decode-0 (pid" in stderr
        and "exited with code 0 (drained); 1 decode worker(s) still serving" in stderr
    )
    assert "tandem serve: no decode worker left; stopping" in stderr
    assert not cluster_file.exists()
    for process in by_id.values():
        _assert_gone(process["pid"])


def test_a_crashed_worker_stops_the_cluster_even_with_others_of_its_kind(
    tmp_path: Path, fake_component: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _serve_args(tmp_path, "--redis-url", "redis://127.0.0.1:1/0", "--decode-workers", "2")

    def command(kind: str, flags: list[str]) -> list[str]:
        crash = kind == "decode" and "decode-0" in flags
        return [sys.executable, str(fake_component), kind, *flags, *(["--exit-after", "2"] if crash else [])]

    assert serve.run(args, command_builder=command) == 1
    err = capsys.readouterr().err
    assert "tandem serve: decode-0 (pid " in err and "exited with code 5" in err
    assert "drained" not in err


def test_a_router_that_exits_0_still_stops_the_cluster(
    tmp_path: Path, fake_component: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _serve_args(
        tmp_path, "--redis-url", "redis://127.0.0.1:1/0", "--cluster-file", str(tmp_path / "c.json")
    )
    stopper = tmp_path / "stop_router.py"  # SIGTERMs the router 2 s after it started: it exits 0
    stopper.write_text(
        "import os, signal, subprocess, sys, threading\n"
        "p = subprocess.Popen(sys.argv[1:])\n"
        "threading.Timer(2.0, lambda: p.send_signal(signal.SIGTERM)).start()\n"
        "sys.exit(p.wait())\n"
    )

    def command(kind: str, flags: list[str]) -> list[str]:
        run = [sys.executable, str(fake_component), kind, *flags]
        return [sys.executable, str(stopper), *run] if kind == "router" else run

    assert serve.run(args, command_builder=command) == 1
    err = capsys.readouterr().err
    assert "tandem serve: router (pid " in err and "exited with code 0" in err
    assert "drained" not in err
