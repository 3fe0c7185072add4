"""Regenerate the Python code for the protos in this folder (needs `grpcio-tools`).

    python fabric/formats/proto/regenerate.py

protoc writes sibling imports as top-level (`import cloudevents_pb2`); they are rewritten to the
installed package path so the generated modules import inside the `umcef` namespace. The `.proto`
files keep their plain names so other languages compile them with `-I` pointing at this folder.
"""

from __future__ import annotations

import re
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped, unused-ignore]

HERE = Path(__file__).resolve().parent
PACKAGE = "umcef.fabric.formats.proto"
PROTOS = ("cloudevents.proto", "gateway.proto")
_STUB_HEADER = "# ruff: noqa\n# mypy: ignore-errors\n"


def main() -> int:
    well_known = str(resources.files("grpc_tools") / "_proto")
    args = ["protoc", f"-I{HERE}", f"-I{well_known}", f"--python_out={HERE}", f"--pyi_out={HERE}",
            f"--grpc_python_out={HERE}", *(str(HERE / p) for p in PROTOS)]
    if protoc.main(args) != 0:
        print("protoc failed", file=sys.stderr)
        return 1
    modules = [p.removesuffix(".proto") + "_pb2" for p in PROTOS]
    for path in sorted(HERE.glob("*_pb2*.py*")):
        text = path.read_text()
        for module in modules:
            text = re.sub(rf"^import {module} as ", f"from {PACKAGE} import {module} as ", text, flags=re.M)
        if path.suffix == ".pyi" and not text.startswith(_STUB_HEADER):
            text = _STUB_HEADER + text  # generated stubs are not held to the project's lint/type rules
        path.write_text(text)
    grpc_stub = HERE / "cloudevents_pb2_grpc.py"
    if grpc_stub.exists() and "def " not in grpc_stub.read_text():
        grpc_stub.unlink()  # cloudevents.proto has no service: its gRPC module would be empty
    return 0


if __name__ == "__main__":
    sys.exit(main())
