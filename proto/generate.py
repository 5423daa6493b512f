"""Generate the Python stubs of ``proto/tandem/v1/*.proto`` into ``proto/``.

Usage: ``python proto/generate.py [OUT_DIR]`` (default: ``proto/``). The stubs are
committed; ``tests/proto/test_stubs.py`` regenerates them into a temporary
directory and checks they match. Run it with the pinned ``grpcio-tools==1.66.2``
(the dev extra): its stubs import under grpcio 1.66 through 1.85 and protobuf 5.27
through 7.x, newer generators' stubs refuse older grpcio runtimes.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent


def proto_files() -> list[Path]:
    """The .proto sources, sorted."""
    return sorted((PROTO_ROOT / "tandem" / "v1").glob("*.proto"))


def generate(out_dir: Path) -> None:
    """Run protoc (from grpcio-tools) over every .proto into ``out_dir``.

    Raises:
        RuntimeError: protoc failed.
    """
    from grpc_tools import protoc  # dev-only dependency

    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT)
