"""values.yaml comments, the chart README's values table and values.schema.json agree."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from tests.charts.values_doc import (
    CHART_DIR,
    README_FILE,
    VALUES_FILE,
    ValuesDocError,
    parse_values,
    readme_keys,
    readme_table,
    render_table,
)

SCHEMA = json.loads((CHART_DIR / "values.schema.json").read_text())


def leaf_paths(data: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every non-map value and every empty map."""
    if isinstance(data, dict) and data:
        return [path for key, value in data.items() for path in leaf_paths(value, f"{prefix}{key}.")]
    return [prefix.rstrip(".")]


def test_readme_lists_exactly_the_documented_values() -> None:
    docs = parse_values(VALUES_FILE.read_text())
    readme = README_FILE.read_text()
    assert readme_keys(readme) == [doc.key for doc in docs]
    assert readme_table(readme) == render_table(docs), "run: python -m tests.charts.values_doc"


def test_every_value_is_documented() -> None:
    documented = [doc.key for doc in parse_values(VALUES_FILE.read_text())]
    assert len(documented) == len(set(documented))
    for path in leaf_paths(yaml.safe_load(VALUES_FILE.read_text())):
        assert any(path == key or path.startswith(f"{key}.") for key in documented), path
    for doc in parse_values(VALUES_FILE.read_text()):
        assert doc.description, doc.key


def test_parser_rejects_an_uncommented_key_and_a_commented_scalar_group() -> None:
    with pytest.raises(ValuesDocError, match=r"values.yaml:3: a.b has no comment"):
        parse_values("# group\na:\n  b: 1\n")
    with pytest.raises(ValuesDocError, match="group a must be a map"):
        parse_values("# not a value\na: 1\n")
    docs = parse_values("# -- (int or null) the x\nx: null\n# g\ng:\n  # -- the y\n  y:\n    z: [1]\n")
    assert [(d.key, d.type, d.default, d.description) for d in docs] == [
        ("x", "int or null", None, "the x"),
        ("g.y", "object", {"z": [1]}, "the y"),
    ]


def schema_node(path: str) -> dict:
    node = SCHEMA
    for key in path.split("."):
        if "$ref" in node:
            node = SCHEMA["$defs"][node["$ref"].rsplit("/", 1)[1]]
        props = node.get("properties")
        assert props is not None and key in props, f"{path}: {key} is not in values.schema.json"
        node = props[key]
    return node


def test_schema_knows_every_documented_value_and_nothing_else() -> None:
    values = yaml.safe_load(VALUES_FILE.read_text())
    for doc in parse_values(VALUES_FILE.read_text()):
        schema_node(doc.key)
    assert set(SCHEMA["properties"]) - {"global"} == set(values)
    assert SCHEMA["additionalProperties"] is False
    for group in ("image", "model", "engine", "redis", "router", "prefill", "decode", "pair", "otel"):
        node = SCHEMA["properties"][group]
        assert node["additionalProperties"] is False, group
        assert set(node["properties"]) == set(values[group]), group
