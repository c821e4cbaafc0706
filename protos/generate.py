"""Regenerate the Python stubs of the gRPC contract from the .proto files.

The stubs are committed next to their sources (``protos/swapmoe/v1/*_pb2*.py``)
so an install needs no code generator; ``tests/test_protos.py`` fails when they
are stale. Run ``python protos/generate.py`` after editing a .proto file.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILES = sorted((PROTO_ROOT / "swapmoe" / "v1").glob("*.proto"))


def generate(out_dir: Path = PROTO_ROOT) -> list[Path]:
    """Compile every .proto under protos/ into out_dir; returns the files written."""
    from grpc_tools import protoc  # imported here: only needed by developers

    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(PROTO_ROOT)) for p in PROTO_FILES],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted((out_dir / "swapmoe" / "v1").glob("*_pb2*.py*"))


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT):
        print(path)
