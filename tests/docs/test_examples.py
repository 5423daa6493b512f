"""The user documentation cannot drift from the code.

Checks, without starting any server:

1. the README's Python blocks and ``examples/python_client.py`` compile, and every
   ``generation_pb2.X`` / ``generation_pb2_grpc.X`` they use exists;
2. ``docs/cli.md``'s generated section equals :func:`render_cli_reference` of the real
   parser (``cli.main.build_parser()``), and every ``tandem <command> --flag`` written
   anywhere in README.md or docs/ names a real command and real flags of it;
3. every metric name in README.md and docs/ is defined in ``engine/metrics.py``;
4. the README's API tables name exactly the rpcs, messages and fields of
   ``tandem.v1.Generation``, and its status codes are real gRPC codes.

``python -m tests.docs.test_examples`` rewrites the generated section of docs/cli.md.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cli.main import build_parser
from tandem.v1 import generation_pb2, generation_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
CLI_DOC = REPO / "docs" / "cli.md"
DOC_FILES = [README, REPO / "docs" / "architecture.md", CLI_DOC]
EXAMPLE = REPO / "examples" / "python_client.py"
METRICS_SOURCE = REPO / "engine" / "metrics.py"

BEGIN_MARKER = "<!-- BEGIN GENERATED: python -m tests.docs.test_examples -->"
END_MARKER = "<!-- END GENERATED -->"

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
INVOCATION = re.compile(r"(?:\btandem|\bcli\.main)\s+([a-z][\w-]*)")
MAKE_SERVE = re.compile(r"\bmake serve ARGS=")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
STUB_NAME = re.compile(r"\b(generation_pb2_grpc|generation_pb2)\.(\w+)")
METRIC = re.compile(r"\btandem_[a-z0-9_]+")
METRIC_SUFFIXES = ("_total", "_created", "_bucket", "_count", "_sum")
TOP_LEVEL_FLAGS = {"--help", "--version"}


# --- the parser -----------------------------------------------------------------


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """``tandem``'s subcommand parsers by name, in declaration order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("tandem has no subcommands")


def long_flags(parser: argparse.ArgumentParser) -> set[str]:
    """Every ``--flag`` the parser accepts (``--help`` included)."""
    return {s for s in parser._option_string_actions if s.startswith("--")}


def _markdown_text(text: str) -> str:
    """Plain help text made safe for a Markdown table cell."""
    for raw, escaped in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("*", "\\*"), ("|", "\\|")):
        text = text.replace(raw, escaped)
    return text


def _expanded_help(action: argparse.Action, prog: str) -> str:
    """``action.help`` with ``%(default)s`` and friends filled in, as argparse prints it."""
    if not action.help:
        return ""
    params = dict(vars(action), prog=prog)
    for name, value in list(params.items()):
        if value is argparse.SUPPRESS:
            del params[name]
        elif hasattr(value, "__name__"):
            params[name] = value.__name__
    if params.get("choices") is not None:
        params["choices"] = ", ".join(map(str, params["choices"]))
    return " ".join((action.help % params).split())


def _command_section(name: str, sub: argparse.ArgumentParser) -> list[str]:
    positionals = " ".join(str(a.metavar or a.dest) for a in sub._actions if not a.option_strings)
    lines = [f"## `tandem {name}`", "", " ".join((sub.description or "").split()), ""]
    lines += ["```text", f"tandem {name} [options] {positionals}".rstrip(), "```", ""]
    formatter = sub._get_formatter()
    for group in sub._action_groups:
        actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
        if not actions:
            continue
        lines += [f"**{group.title}**", "", "| option | description |", "| --- | --- |"]
        for action in actions:
            invocation = formatter._format_action_invocation(action).replace("|", "\\|")
            lines.append(f"| `{invocation}` | {_markdown_text(_expanded_help(action, sub.prog))} |")
        lines.append("")
    if sub.epilog:
        lines += ["```text", sub.epilog.rstrip(), "```", ""]
    return lines


def render_cli_reference(parser: argparse.ArgumentParser) -> str:
    """The generated part of docs/cli.md: one section per subcommand, from the parser itself.

    Independent of the terminal width and of the Python version's help layout.
    """
    commands = subcommands(parser)
    lines = ["| command | what it does |", "| --- | --- |"]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                lines.append(f"| [`tandem {choice.dest}`](#tandem-{choice.dest}) | {choice.help} |")
    lines.append("")
    for name, sub in commands.items():
        lines += _command_section(name, sub)
    return "\n".join(lines).rstrip() + "\n"


def generated_section(text: str) -> str:
    """The text between the BEGIN and END markers of docs/cli.md."""
    start = text.index(BEGIN_MARKER) + len(BEGIN_MARKER)
    return text[start : text.index(END_MARKER)].strip("\n") + "\n"


def write_cli_reference() -> None:
    """Replace docs/cli.md's generated section with the current parser's."""
    text = CLI_DOC.read_text()
    start = text.index(BEGIN_MARKER) + len(BEGIN_MARKER)
    end = text.index(END_MARKER)
    CLI_DOC.write_text(text[:start] + "\n" + render_cli_reference(build_parser()) + text[end:])


# --- reading the docs -------------------------------------------------------------


def code_lines(text: str) -> Iterator[tuple[int, list[str]]]:
    """``(line number, code fragments on that line)`` for every line holding code.

    In a fenced block the whole line is one fragment; elsewhere each inline code span
    is one. A fenced line ending in a backslash continues onto the next one (joined).
    """
    in_fence = False
    pending = ""
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("```"):
            in_fence = not in_fence
            pending = ""
            continue
        if in_fence:
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            yield number, [pending + line]
            pending = ""
        else:
            spans = INLINE_CODE.findall(line)
            if spans:
                yield number, spans


def python_blocks(text: str) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if lang == "python"]


# --- 1. Python examples -------------------------------------------------------------


def test_readme_python_blocks_compile() -> None:
    blocks = python_blocks(README.read_text())
    assert blocks, "README.md has no ```python block"
    for index, block in enumerate(blocks):
        compile(block, f"README.md python block {index}", "exec")


def test_example_client_compiles() -> None:
    compile(EXAMPLE.read_text(), str(EXAMPLE), "exec")


@pytest.mark.parametrize("source", [README, EXAMPLE], ids=lambda p: p.name)
def test_examples_use_real_stub_names(source: Path) -> None:
    text = source.read_text()
    used = set(STUB_NAME.findall(text))
    assert ("generation_pb2_grpc", "GenerationStub") in used
    modules = {"generation_pb2": generation_pb2, "generation_pb2_grpc": generation_pb2_grpc}
    missing = sorted(f"{mod}.{name}" for mod, name in used if not hasattr(modules[mod], name))
    assert missing == [], f"{source.name} uses names the stubs do not have"


# --- 2. CLI reference ---------------------------------------------------------------


def test_cli_reference_matches_the_parser() -> None:
    documented = generated_section(CLI_DOC.read_text())
    assert documented == render_cli_reference(build_parser()), (
        "docs/cli.md is out of date: run `.venv/bin/python -m tests.docs.test_examples`"
    )


def test_cli_reference_covers_every_command_and_flag() -> None:
    documented = generated_section(CLI_DOC.read_text())
    for name, sub in subcommands(build_parser()).items():
        section = documented.split(f"## `tandem {name}`", 1)[1].split("\n## ", 1)[0]
        missing = sorted(f for f in long_flags(sub) - {"--help"} if f"`{f}" not in section)
        assert missing == [], f"docs/cli.md: tandem {name} lacks {missing}"


def _check_invocations(path: Path) -> list[str]:
    """Every problem with the ``tandem`` commands and flags written in ``path``.

    A code fragment that invokes ``tandem <command>`` (or ``make serve ARGS=...``) names
    that command; its flags, and those of inline spans on the same line that are bare
    flags (``--stream``), must belong to the commands named on the line, or to any
    command when the line names none. Other programs' command lines are not checked.
    """
    commands = subcommands(build_parser())
    every_flag = set().union(*(long_flags(sub) for sub in commands.values())) | TOP_LEVEL_FLAGS
    problems = []
    for number, fragments in code_lines(path.read_text()):
        names: list[str] = []
        flags: set[str] = set()
        for fragment in fragments:
            invoked = INVOCATION.findall(fragment) + (["serve"] if MAKE_SERVE.search(fragment) else [])
            names += invoked
            if invoked or fragment.startswith("--"):
                flags |= set(FLAG.findall(fragment))
        unknown = [n for n in names if n not in commands]
        if unknown:
            problems.append(f"{path.name}:{number}: no command `tandem {unknown[0]}`")
            continue
        if names:
            allowed = set().union(*(long_flags(commands[n]) for n in names)) | TOP_LEVEL_FLAGS
        else:
            allowed = every_flag
        problems += [
            f"{path.name}:{number}: no flag {f} for {names or 'any command'}" for f in sorted(flags - allowed)
        ]
    return problems


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: p.name)
def test_documented_commands_and_flags_exist(path: Path) -> None:
    assert _check_invocations(path) == []


def test_invocation_check_catches_a_bad_flag(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(
        "Run `tandem generate --stream --frobnicate` or `ruff format --check`.\n"
        "| `tandem router` | `--routing` `--transfer-port` |\n"
        "Flags: `--stream`, `--bogus`.\n\n"
        "```bash\ntandem serve \\\n    --no-such-flag\ntandem lunch\npip install --no-deps x\n```\n"
    )
    assert _check_invocations(doc) == [
        "doc.md:1: no flag --frobnicate for ['generate']",
        "doc.md:2: no flag --transfer-port for ['router']",
        "doc.md:3: no flag --bogus for any command",
        "doc.md:7: no flag --no-such-flag for ['serve']",
        "doc.md:8: no command `tandem lunch`",
    ]


# --- 3. metrics ---------------------------------------------------------------------


def documented_metrics() -> set[str]:
    """Metric names as the docs write them (exported names, suffixes included)."""
    return {name for path in DOC_FILES for name in METRIC.findall(path.read_text())}


def metric_is_defined(name: str, source: str) -> bool:
    """Whether ``source`` defines ``name``, or the metric that exports it with a suffix
    (a counter ``tandem_x`` is exported as ``tandem_x_total``; a gauge may end in ``_total``)."""
    candidates = {name} | {name.removesuffix(s) for s in METRIC_SUFFIXES if name.endswith(s)}
    return any(f'"{candidate}"' in source for candidate in candidates)


def test_documented_metrics_exist() -> None:
    names = documented_metrics()
    assert {"tandem_kv_blocks_used", "tandem_requests_total"} <= names
    source = METRICS_SOURCE.read_text()
    assert sorted(n for n in names if not metric_is_defined(n, source)) == []


def test_metric_check_rejects_unknown_names() -> None:
    source = 'Counter("tandem_requests", ...)\nGauge("tandem_kv_blocks_total", ...)'
    assert metric_is_defined("tandem_requests_total", source)
    assert metric_is_defined("tandem_kv_blocks_total", source)
    assert not metric_is_defined("tandem_requests_running", source)
    assert not metric_is_defined("tandem_ttft_seconds_bucket", source)


# --- 4. public API tables -----------------------------------------------------------


def readme_table_rows() -> list[list[str]]:
    """Cells of every Markdown table row of the README (header and rule rows included)."""
    rows = []
    for line in README.read_text().splitlines():
        if line.startswith("| "):
            rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return rows


def test_readme_names_every_rpc() -> None:
    service = generation_pb2.DESCRIPTOR.services_by_name["Generation"]
    documented = {m for row in readme_table_rows() for m in re.findall(r"^`(\w+)`$", row[0])}
    assert set(service.methods_by_name) <= documented


def test_readme_message_fields_are_exact() -> None:
    messages = generation_pb2.DESCRIPTOR.message_types_by_name
    seen = set()
    for row in readme_table_rows():
        name = re.fullmatch(r"`(\w+)`", row[0])
        if name is None or name[1] not in messages or len(row) != 2:
            continue
        seen.add(name[1])
        fields = set(re.findall(r"`([a-z_][a-z0-9_]*)`", row[1]))
        assert fields == set(messages[name[1]].fields_by_name), f"README's row of {name[1]}"
    assert {"GenerateRequest", "SamplingParams", "GenerateResponse", "GenerateStreamResponse"} <= seen


def test_readme_enum_values_and_status_codes_exist() -> None:
    text = README.read_text()
    finish_reasons = set(re.findall(r"\bFINISH_REASON_[A-Z]+\b", text))
    assert finish_reasons and finish_reasons <= set(generation_pb2.FinishReason.keys())
    codes = {m for row in readme_table_rows() for m in re.findall(r"^`([A-Z_]+)`$", row[0])}
    assert "INVALID_ARGUMENT" in codes
    assert sorted(codes - set(grpc.StatusCode.__members__)) == []


if __name__ == "__main__":
    write_cli_reference()
    sys.exit(0)
