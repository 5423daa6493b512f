"""The committed gRPC stubs match the .proto files and keep the public names."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "proto"))
import generate  # noqa: E402  (proto/generate.py)


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools not installed")
def test_committed_stubs_match_proto_sources(tmp_path: Path) -> None:
    generate.generate(tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*.py*"))
    assert fresh, "protoc produced nothing"
    for rel in fresh:
        committed = ROOT / "proto" / rel
        assert committed.exists(), f"{rel} is not committed: run `make proto`"
        assert committed.read_bytes() == (tmp_path / rel).read_bytes(), f"{rel} is stale: run `make proto`"


def test_public_contract_names() -> None:
    from tandem.v1 import generation_pb2

    service = generation_pb2.DESCRIPTOR.services_by_name["Generation"]
    methods = {m.name: (m.input_type.name, m.output_type.name, m.server_streaming) for m in service.methods}
    assert methods == {
        "Generate": ("GenerateRequest", "GenerateResponse", False),
        "GenerateStream": ("GenerateRequest", "GenerateStreamResponse", True),
        "GetModelInfo": ("GetModelInfoRequest", "ModelInfo", False),
    }
    fields = {f.name for f in generation_pb2.GenerateRequest.DESCRIPTOR.fields}
    assert fields >= {"request_id", "prompt", "prompt_token_ids", "sampling"}
    sampling = {f.name: f.type for f in generation_pb2.SamplingParams.DESCRIPTOR.fields}
    assert set(sampling) >= {"max_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos"}
    info = {f.name for f in generation_pb2.ModelInfo.DESCRIPTOR.fields}
    assert info == {"model_name", "architecture", "max_model_len", "vocab_size", "block_size", "dtype"}
    usage = {f.name for f in generation_pb2.Usage.DESCRIPTOR.fields}
    assert usage == {"prompt_tokens", "completion_tokens", "cached_prompt_tokens"}


def test_enums_start_unspecified() -> None:
    from tandem.v1 import generation_pb2, worker_pb2

    for enum in (generation_pb2.FinishReason, worker_pb2.WorkerRole):
        zero = enum.Name(0)
        assert zero.endswith("_UNSPECIFIED"), zero
