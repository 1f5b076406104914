"""Generate the Python modules of the API from proto/.

Usage: python proto/generate.py [OUTPUT_DIR]

The output goes to the repository root by default, so that
proto/registry/v1/registry.proto becomes the package registry.v1. The drift
test runs the same function into a temporary folder and compares.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTOS = ("registry/v1/registry.proto",)
GENERATED = (
    "registry/v1/registry_pb2.py",
    "registry/v1/registry_pb2.pyi",
    "registry/v1/registry_pb2_grpc.py",
    "registry/v1/registry_grpc.py",
)


def generate(output: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    # purerpc's plugin is a console script beside this interpreter, which
    # need not be on PATH (a venv that is not activated).
    plugin = Path(sys.executable).parent / "protoc-gen-purerpc"
    args = [
        "protoc",
        f"--plugin=protoc-gen-purerpc={plugin}",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={output}",
        f"--pyi_out={output}",
        f"--grpc_python_out={output}",
        f"--purerpc_out={output}",
        *(str(PROTO_ROOT / proto) for proto in PROTOS),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the message above")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT.parent)
