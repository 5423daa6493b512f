"""``tandem serve``: the whole stack on one machine, each component in its own process.

Steps:

1. Create the run directory (``$TMPDIR/tandem-<pid>/`` unless ``--run-dir``) for the logs.
2. Start a private Redis server unless ``--redis-url`` names one.
3. Pick free ports for every worker's gRPC, metrics and (decode) KV transfer servers and
   for the router's metrics server; the router's gRPC port is ``--port``.
4. Start ``prefill-0..N-1``, ``decode-0..M-1`` and the router, each as
   ``python -m cli.main prefill|decode|router <flags>``.
5. Wait until every one reports SERVING on ``grpc.health.v1``; print the table and write
   ``--cluster-file`` (atomically).
6. Serve until SIGINT/SIGTERM (exit 0) or until a child dies (exit 1); then stop the
   router, then the workers, then Redis, and remove the cluster file. A worker that
   exits 0 (someone sent it SIGTERM and it drained) while another worker of its kind
   runs is logged and dropped from the cluster file, and the cluster serves on; a
   crash (non-zero exit code or a signal), the router's exit or the exit of the last
   worker of a kind stops the cluster (``cli.supervisor.tolerated_exit``).

Process, gRPC, Redis and rich modules are imported inside the functions that use them,
so that building the ``tandem`` parser (``tandem --help``, ``tandem generate``) stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cli.options import (
    add_model_options,
    add_network_options,
    add_observability_options,
    add_router_options,
    add_worker_options,
    observability_flags,
    positive_float,
    positive_int,
    router_config_from_args,
    router_flags,
    worker_config_from_args,
    worker_flags,
)
from cli.security_options import cluster_security
from engine.security_config import REDIS_URL_ENV, redact_url, redis_url_env
from engine.worker_config import Role

if TYPE_CHECKING:
    from rich.table import Table

    from cli.redis_launcher import RedisProcess
    from cli.supervisor import ComponentSpec, Supervisor

#: ``(kind, flags) -> argv`` of one component; tests swap in fake servers.
CommandBuilder = Callable[[str, list[str]], list[str]]

DEFAULT_ROUTER_PORT = 50051
#: Seconds each process gets after SIGTERM beyond ``--drain-timeout-s``, before SIGKILL.
GRACE_S = 10.0


def default_command(kind: str, flags: list[str]) -> list[str]:
    """``[python, -m, cli.main, kind, *flags]`` with this interpreter."""
    return [sys.executable, "-m", "cli.main", kind, *flags]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the options of ``tandem serve``."""
    add_model_options(parser)
    add_network_options(parser, default_port=DEFAULT_ROUTER_PORT, redis_url_default=None)
    add_worker_options(parser, role=None)
    add_router_options(parser, standalone=False)
    add_observability_options(parser)
    group = parser.add_argument_group("cluster")
    group.add_argument(
        "--prefill-workers", type=positive_int, default=1, metavar="N", help="prefill workers (default: 1)"
    )
    group.add_argument(
        "--decode-workers", type=positive_int, default=1, metavar="M", help="decode workers (default: 1)"
    )
    group.add_argument(
        "--cluster-file",
        type=Path,
        metavar="PATH",
        help="write the processes and addresses as JSON here once everything is SERVING; removed on exit",
    )
    group.add_argument(
        "--startup-timeout",
        type=positive_float,
        default=180.0,
        metavar="S",
        help="seconds to wait for every process to report SERVING (default: 180)",
    )
    group.add_argument(
        "--run-dir",
        type=Path,
        metavar="DIR",
        help="directory of the log files (default: $TMPDIR/tandem-<pid>)",
    )


def count_cuda_devices() -> int:
    """Visible CUDA GPUs, asked of torch in a child process (the CLI itself stays torch-free)."""
    probe = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
        return int(done.stdout.strip() or 0)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return 0


def worker_devices(device: str, count_gpus: Callable[[], int] = count_cuda_devices) -> list[str]:
    """Devices handed to workers in turn: with ``cuda`` (or ``auto`` on a GPU host) and
    several GPUs, round robin over ``cuda:0..N-1``, so that a prefill and a decode worker
    land on different GPUs; otherwise every worker gets ``device`` as given."""
    if device not in ("cuda", "auto"):
        return [device]
    n = count_gpus()
    return [f"cuda:{i}" for i in range(n)] if n > 1 else [device]


def plan_cluster(
    args: argparse.Namespace,
    redis_url: str,
    *,
    command_builder: CommandBuilder = default_command,
    pick_port: Callable[[str], int] | None = None,
) -> list[ComponentSpec]:
    """The components to start, workers first, router last.

    Every port not given (all workers' ports, and the router's ``--port`` or
    ``--metrics-port`` when 0) comes from ``pick_port(host)`` (default
    :func:`cli.supervisor.free_port`), all distinct.
    """
    from cli.supervisor import ComponentSpec, free_port

    pick_port = pick_port or free_port
    taken: set[int] = {args.port} - {0}

    def port() -> int:
        for _ in range(100):
            candidate = pick_port(args.host)
            if candidate not in taken:
                taken.add(candidate)
                return candidate
        raise RuntimeError("could not find enough distinct free ports")

    base = dataclasses.replace(worker_config_from_args(args, "prefill"), redis_url=redis_url)
    devices = worker_devices(base.device)
    specs: list[ComponentSpec] = []
    roles: list[tuple[Role, int]] = [("prefill", args.prefill_workers), ("decode", args.decode_workers)]
    if base.colocated:  # one pool of workers that prefill and decode
        roles = [("decode", args.decode_workers)]
    for role, count in roles:
        kind = "colocated" if base.colocated else role
        for index in range(count):
            config = dataclasses.replace(
                base,
                role=role,
                device=devices[len(specs) % len(devices)],
                worker_id=f"{kind}-{index}",
                port=port(),
                metrics_port=port(),
                transfer_port=port() if role == "decode" else 0,
            )
            specs.append(
                ComponentSpec(
                    kind=kind,
                    id=config.worker_id or "",
                    argv=tuple(command_builder(role, [*worker_flags(config), *observability_flags(args)])),
                    host=config.host,
                    port=config.port,
                    metrics_port=config.metrics_port,
                    transfer_port=config.transfer_port if role == "decode" else None,
                )
            )
    router = router_config_from_args(args)
    router = dataclasses.replace(
        router, redis_url=redis_url, port=router.port or port(), metrics_port=router.metrics_port or port()
    )
    specs.append(
        ComponentSpec(
            kind="router",
            id="router",
            argv=tuple(command_builder("router", [*router_flags(router), *observability_flags(args)])),
            host=router.host,
            port=router.port,
            metrics_port=router.metrics_port,
        )
    )
    return specs


def run(args: argparse.Namespace, *, command_builder: CommandBuilder = default_command) -> int:
    """Runs ``tandem serve`` until SIGINT/SIGTERM (returns 0) or a failure (returns 1)."""
    from rich.console import Console

    from cli.redis_launcher import RedisUnavailable, start_redis
    from cli.supervisor import StartupError, Supervisor

    run_dir = args.run_dir or Path(tempfile.gettempdir()) / f"tandem-{os.getpid()}"
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"tandem serve: logs in {run_dir}/", flush=True)
    # Secrets (the internal token, generated per run, and bearer tokens) reach the
    # children in their environment, never on a command line.
    # So does a Redis URL with a password.
    security = cluster_security(args)
    user_redis_url = args.redis_url or os.environ.get(REDIS_URL_ENV)
    env = {**security.secret_env(), **redis_url_env(user_redis_url or "")}
    supervisor = Supervisor(run_dir, grace_s=args.drain_timeout_s + GRACE_S, env=env, security=security)
    redis: RedisProcess | None = None
    wrote_cluster_file = False
    with _stop_on_signals() as stop:
        try:
            if user_redis_url is None:
                redis = start_redis(run_dir)
            redis_url = user_redis_url or (redis.url if redis else "")
            for spec in plan_cluster(args, redis_url, command_builder=command_builder):
                supervisor.spawn(spec)
            if not supervisor.wait_serving(args.startup_timeout, stop):
                return 0
            summary = cluster_summary(supervisor, redis, redis_url)
            Console().print(_table(summary))
            if args.cluster_file:
                write_json_atomic(args.cluster_file, summary)
                wrote_cluster_file = True
            print(
                f"tandem serve: router on {summary['router']['grpc_address']}, "
                f"redis at {redact_url(redis_url)}; "
                "Ctrl-C stops",
                flush=True,
            )
            return _serve_until_stopped(supervisor, redis, stop, args.cluster_file, redis_url)
        except (RedisUnavailable, StartupError) as error:
            print(f"tandem serve: {error}", file=sys.stderr)
            return 1
        finally:
            supervisor.stop_all()
            if redis is not None:
                redis.stop()
            if wrote_cluster_file:
                args.cluster_file.unlink(missing_ok=True)


def cluster_summary(supervisor: Supervisor, redis: RedisProcess | None, redis_url: str) -> dict[str, Any]:
    """The cluster file's content: ``{"router", "processes", "redis_url"}``."""
    processes: list[dict[str, Any]] = []
    if redis is not None:
        processes.append(
            {
                "kind": "redis",
                "id": "redis",
                "pid": redis.pid,
                "grpc_address": None,
                "metrics_address": None,
                "transfer_address": None,
                "log": str(redis.log),
            }
        )
    ordered = sorted(
        (c for c in supervisor.children if c not in supervisor.exited),
        key=lambda c: ("router", "prefill", "decode", "colocated").index(c.spec.kind),
    )
    for child in ordered:
        processes.append(
            {
                "kind": child.spec.kind,
                "id": child.spec.id,
                "pid": child.pid,
                "grpc_address": child.spec.grpc_address,
                "metrics_address": child.spec.metrics_address,
                "transfer_address": child.spec.transfer_address,
                "log": str(child.log),
            }
        )
    router = next(p for p in processes if p["kind"] == "router")
    return {"router": router, "processes": processes, "redis_url": redact_url(redis_url)}


def write_json_atomic(path: Path, content: dict[str, Any]) -> None:
    """Writes ``content`` as JSON to a temporary file beside ``path``, then renames it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(content, out, indent=2)
            out.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _serve_until_stopped(
    supervisor: Supervisor,
    redis: RedisProcess | None,
    stop: threading.Event,
    cluster_file: Path | None,
    redis_url: str,
) -> int:
    while not stop.wait(0.2):
        drained, dead = supervisor.check_exits()
        for child in drained:
            left = len(supervisor.running(child.spec.kind))
            print(
                f"tandem serve: {child.spec.id} (pid {child.pid}) exited with code 0 (drained); "
                f"{left} {child.spec.kind} worker(s) still serving",
                file=sys.stderr,
                flush=True,
            )
        if drained and cluster_file is not None:
            write_json_atomic(cluster_file, cluster_summary(supervisor, redis, redis_url))
        if dead is not None:
            print(f"tandem serve: {dead.describe_exit()}", file=sys.stderr)
            if dead.popen.returncode == 0 and dead.spec.kind != "router":
                print(f"tandem serve: no {dead.spec.kind} worker left; stopping", file=sys.stderr)
            return 1
        if redis is not None and redis.poll() is not None:
            print(f"tandem serve: redis-server (pid {redis.pid}) exited; log {redis.log}", file=sys.stderr)
            return 1
    print("tandem serve: stopping the router, then the workers", flush=True)
    return 0


@contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """Sets the yielded event on SIGINT or SIGTERM; restores the previous handlers on exit."""
    stop = threading.Event()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda _signum, _frame: stop.set())
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _table(summary: dict[str, Any]) -> Table:
    from rich.table import Table

    table = Table(title="Tandem cluster")
    for column in ("kind", "id", "pid", "grpc address", "metrics address", "log"):
        table.add_column(column)
    for process in summary["processes"]:
        table.add_row(
            process["kind"],
            process["id"],
            str(process["pid"]),
            process["grpc_address"] or "-",
            process["metrics_address"] or "-",
            process["log"],
        )
    return table
