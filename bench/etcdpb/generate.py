"""Generate the Python modules of etcd's v3 gRPC API, for the bench.

Usage: python bench/etcdpb/generate.py [ETCD_SOURCE]

The .proto files come from Debian's golang-etcd-server-dev package
(`apt-get install golang-etcd-server-dev`), which installs etcd's source under
/usr/share/gocode/src/go.etcd.io/etcd; its version matches the etcd-server
package the bench runs (3.4). The files are rewritten before protoc sees them:

- the gogoproto options and the google.api.http annotations go: they only
  steer Go code generation and the HTTP gateway, and protoc would need their
  own .proto files (and Python modules for them) to accept them;
- imports name the copies under bench/etcdpb, so the generated modules import
  each other as bench.etcdpb.*.

Package names stay as they are: they are part of the gRPC method paths
(/etcdserverpb.KV/Range).
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

DEFAULT_SOURCE = Path("/usr/share/gocode/src/go.etcd.io/etcd")
OUTPUT = Path(__file__).resolve().parent.parent.parent
PACKAGE = "bench/etcdpb"
# Path in etcd's tree -> module name here.
PROTOS = {
    "mvcc/mvccpb/kv.proto": "kv.proto",
    "auth/authpb/auth.proto": "auth.proto",
    "etcdserver/etcdserverpb/rpc.proto": "rpc.proto",
}

_DROPPED_IMPORTS = re.compile(
    r'^import "(gogoproto/gogo|google/api/annotations)\.proto";\n', re.M
)
_GOGO_OPTION = re.compile(r"^option \(gogoproto\.[a-z_]+\) = \w+;\n", re.M)
_HTTP_OPTION = "option (google.api.http) = {"


def _drop_http_options(text: str) -> str:
    """Remove each `option (google.api.http) = {...};`, nested braces and all."""
    while (start := text.find(_HTTP_OPTION)) >= 0:
        depth = 0
        for end in range(start + len(_HTTP_OPTION) - 1, len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                break
        if not text.startswith("};", end):
            raise SystemExit("an HTTP option does not end the way the rewrite expects")
        text = text[:start] + text[end + 2 :]
    return text


def rewrite(text: str) -> str:
    text = _DROPPED_IMPORTS.sub("", text)
    text = _GOGO_OPTION.sub("", text)
    text = _drop_http_options(text)
    for original, copy in PROTOS.items():
        text = text.replace(f'import "etcd/{original}";', f'import "{PACKAGE}/{copy}";')
    if "gogoproto" in text or "google.api" in text:
        raise SystemExit("an option the rewrite does not know is left; extend it")
    return text


def generate(source: Path, output: Path) -> None:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / PACKAGE).mkdir(parents=True)
        for original, copy in PROTOS.items():
            text = (source / original).read_text(encoding="utf-8")
            (root / PACKAGE / copy).write_text(rewrite(text), encoding="utf-8")
        args = [
            "protoc",
            f"-I{root}",
            f"--python_out={output}",
            f"--pyi_out={output}",
            f"--grpc_python_out={output}",
            *(str(root / PACKAGE / copy) for copy in PROTOS.values()),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed; see the message above")
    # Only rpc.proto has services; the others' _grpc modules would be empty.
    for copy in ("kv", "auth"):
        (output / PACKAGE / f"{copy}_pb2_grpc.py").unlink()


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_SOURCE, OUTPUT)
