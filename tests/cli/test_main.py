"""``tandem`` entry point: help texts in a subprocess, and no torch import on light paths."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers.net import free_port

SUBCOMMANDS = ("serve", "router", "prefill", "decode", "generate")


def _tandem(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *argv], capture_output=True, text=True, timeout=30, check=False
    )


def test_top_level_help_lists_every_subcommand() -> None:
    result = _tandem("--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: tandem ")
    for name in SUBCOMMANDS:
        assert f"\n    {name} " in result.stdout


@pytest.mark.parametrize(
    ("name", "options"),
    [
        (
            "serve",
            ["--prefill-workers", "--decode-workers", "--cluster-file", "--startup-timeout", "--redis-url"],
        ),
        ("router", ["--routing", "--max-queue-len", "--lease-ms", "--redis-prefix"]),
        ("prefill", ["--block-size", "--num-kv-blocks", "--worker-id", "--max-num-batched-tokens"]),
        ("decode", ["--transfer-port", "--lease-ms", "--kv-cache-memory-gb"]),
        ("generate", ["--target", "--max-tokens", "--top-p", "--stream", "--json"]),
    ],
)
def test_subcommand_help(name: str, options: list[str]) -> None:
    result = _tandem(name, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: tandem {name} ")
    for option in options:
        assert option in result.stdout


def test_prefill_has_no_transfer_port() -> None:
    result = _tandem("prefill", "--transfer-port", "5")
    assert result.returncode == 2
    assert "unrecognized arguments: --transfer-port 5" in result.stderr


def test_version() -> None:
    result = _tandem("--version")
    assert result.returncode == 0
    assert result.stdout == "tandem 0.1.0\n"


def test_help_and_generate_never_import_torch() -> None:
    # generate runs for real against a closed port: exit 1 with UNAVAILABLE, still no torch.
    script = f"""
import sys
from cli.main import main
for argv in (["--help"], ["serve", "--help"], ["router", "--help"], ["generate", "--help"]):
    try:
        main(argv)
    except SystemExit as exit_:
        assert exit_.code == 0, argv
code = main(["generate", "hi", "--target", "127.0.0.1:{free_port()}", "--timeout", "5"])
print("RESULT", code, sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "RESULT 1 []"
    assert result.stderr.startswith("error: UNAVAILABLE: ")
