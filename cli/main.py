"""The ``tandem`` command: start a cluster or one component, or send a request.

Subcommands (``tandem <subcommand> --help`` lists every option):

- ``serve``: the whole stack on this machine (Redis, prefill and decode workers, router).
- ``router``: the public ``tandem.v1.Generation`` gRPC service (never imports torch).
- ``prefill`` / ``decode``: one worker process.
- ``generate``: send one prompt to a router and print the completion.
- ``bench``: load a router with many requests and report TTFT, TPOT and goodput.

Servers are imported inside their subcommand only, so ``tandem --help``, ``tandem
generate``, ``tandem bench`` and ``tandem router`` stay fast and torch-free.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cli import generate, serve
from cli.bench import command as bench
from cli.options import (
    add_model_options,
    add_network_options,
    add_observability_options,
    add_router_options,
    add_worker_options,
    router_config_from_args,
    setup_observability,
    worker_config_from_args,
)
from engine.worker_config import Role, WorkerConfig

SERVE_EPILOG = """\
examples:
  tandem serve                                  # CPU, bundled model, router on 127.0.0.1:50051
  tandem serve --prefill-workers 2 --decode-workers 2 --cluster-file cluster.json
  tandem serve --redis-url redis://127.0.0.1:6379/0 --port 6000

Ctrl-C (or SIGTERM) stops the router, then the workers, then the private Redis server."""

GENERATE_EPILOG = """\
examples:
  tandem generate "The capital of France is"
  tandem generate "Once upon a time" --max-tokens 128 --temperature 0.8 --top-p 0.95 --seed 7 --stream
  tandem generate "Hello" --target 10.0.0.5:50051 --json"""


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``tandem`` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="tandem",
        description="Tandem: LLM serving with disaggregated prefill and decode over gRPC.",
    )
    parser.add_argument("--version", action="version", version=f"tandem {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    formatter = argparse.RawDescriptionHelpFormatter

    serve_parser = commands.add_parser(
        "serve",
        help="start Redis, prefill and decode workers and the router on this machine",
        description="Start a whole Tandem cluster on this machine, one process per component,\n"
        "and keep it running until Ctrl-C. Logs go to a run directory that is printed first.\n"
        "Model and worker options apply to every worker; --port is the router's.",
        epilog=SERVE_EPILOG,
        formatter_class=formatter,
    )
    serve.add_arguments(serve_parser)
    serve_parser.set_defaults(handler=serve.run)

    router_parser = commands.add_parser(
        "router",
        help="run the public Generation gRPC service",
        description="Run the router: the public tandem.v1.Generation gRPC service. It tokenizes "
        "prompts, finds workers in the Redis registry and relays tokens. Never imports torch.",
    )
    add_model_options(router_parser, engine=False)
    add_network_options(router_parser, default_port=50051, redis_url_default=WorkerConfig.redis_url)
    add_router_options(router_parser)
    add_observability_options(router_parser)
    router_parser.set_defaults(handler=_run_router)

    roles: list[tuple[Role, str]] = [
        ("prefill", "computes prompts' KV cache and pushes it to decode workers"),
        ("decode", "reserves KV blocks, receives prompts' KV and generates tokens"),
    ]
    for role, summary in roles:
        worker_parser = commands.add_parser(
            role,
            help=f"run one {role} worker",
            description=f"Run one {role} worker: it {summary}. It registers itself in Redis.",
        )
        add_model_options(worker_parser)
        add_network_options(worker_parser, default_port=0, redis_url_default=WorkerConfig.redis_url)
        add_worker_options(worker_parser, role=role)
        add_observability_options(worker_parser)
        worker_parser.set_defaults(handler=_run_prefill if role == "prefill" else _run_decode)

    generate_parser = commands.add_parser(
        "generate",
        help="send one prompt to a router and print the completion",
        description="Send one prompt to a running router (tandem.v1.Generation) and print the\n"
        "completion. Exits 1 with 'error: <CODE>: <details>' on a gRPC error.",
        epilog=GENERATE_EPILOG,
        formatter_class=formatter,
    )
    generate.add_arguments(generate_parser)
    generate_parser.set_defaults(handler=generate.run)

    bench_parser = commands.add_parser(
        "bench",
        help="load a router with requests and report TTFT, TPOT, ITL, throughput and goodput",
        description="Send many requests to a running router (Poisson arrivals, a fixed concurrency\n"
        "or a sweep of rates) and report latency percentiles, throughput and goodput under SLOs\n"
        "as a table, JSON and PNG plots. Uses only the public tandem.v1.Generation API.",
        epilog=bench.EPILOG,
        formatter_class=formatter,
    )
    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(handler=bench.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parses ``argv`` (default: ``sys.argv[1:]``) and runs the subcommand; returns its exit code.

    Raises:
        SystemExit: bad options (status 2), ``--help`` or ``--version`` (status 0).
    """
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


def _run_router(args: argparse.Namespace) -> int:
    config = router_config_from_args(args)
    setup_observability(args, "router", "router")
    from router.server import run

    return run(config)


def _run_prefill(args: argparse.Namespace) -> int:
    config = worker_config_from_args(args, "prefill")
    setup_observability(args, "prefill", config.resolved_worker_id)
    from prefill_service.server import run

    return run(config)


def _run_decode(args: argparse.Namespace) -> int:
    config = worker_config_from_args(args, "decode")
    setup_observability(args, "decode", config.resolved_worker_id)
    from decode_service.server import run

    return run(config)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("tandem")
    except metadata.PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
