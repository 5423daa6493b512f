"""``--migrate-on-failure`` and ``--max-prefill-retries``: parsed, round-tripped through
``router_flags``, and passed by ``tandem serve`` to its router."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from cli import serve
from cli.main import build_parser
from cli.options import router_config_from_args, router_flags
from router.config import RouterConfig


def test_defaults_are_off_and_two_retries() -> None:
    config = router_config_from_args(build_parser().parse_args(["router"]))
    assert (config.migrate_on_failure, config.max_prefill_retries) == (False, 2)
    assert "--migrate-on-failure" not in router_flags(config)


@pytest.mark.parametrize(("migrate", "retries"), [(True, 0), (False, 5), (True, 2)])
def test_router_flags_round_trip(tmp_path: Path, migrate: bool, retries: int) -> None:
    config = replace(RouterConfig(model=tmp_path), migrate_on_failure=migrate, max_prefill_retries=retries)
    args = build_parser().parse_args(["router", *router_flags(config)])
    assert router_config_from_args(args) == config


def test_serve_passes_the_flags_to_its_router(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["serve", "--model", str(tmp_path), "--migrate-on-failure", "--max-prefill-retries", "1"]
    )
    ports = iter(range(42000, 42100))
    specs = serve.plan_cluster(args, "redis://127.0.0.1:7000/0", pick_port=lambda _host: next(ports))
    (router,) = [s for s in specs if s.kind == "router"]
    argv = list(router.argv)
    assert "--migrate-on-failure" in argv
    assert argv[argv.index("--max-prefill-retries") + 1] == "1"
    workers = [s for s in specs if s.kind != "router"]
    assert all("--migrate-on-failure" not in s.argv for s in workers)


def test_negative_retries_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["router", "--max-prefill-retries", "-1"])
    assert info.value.code == 2
    assert "--max-prefill-retries" in capsys.readouterr().err
