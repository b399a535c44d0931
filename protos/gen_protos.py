"""Regenerate trio_gateway/_proto/ from protos/*.proto.

    python protos/gen_protos.py            # rewrite trio_gateway/_proto/
    python protos/gen_protos.py --check    # exit 1 if the shipped code differs

Needs grpcio-tools (a test dependency; the package itself never imports it) and grpclib, whose
protoc plugin ``protoc-gen-grpclib_python`` writes the ``*_grpc.py`` handler bases. Imports in
the generated code are made package-relative, so ``trio_gateway._proto`` is self-contained.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
TARGET = ROOT / "trio_gateway" / "_proto"
HEADER = '"""Generated from protos/ by protos/gen_protos.py: do not edit."""\n'


def _plugin() -> str:
    found = shutil.which("protoc-gen-grpclib_python", path=str(Path(sys.executable).parent))
    found = found or shutil.which("protoc-gen-grpclib_python")
    if found is None:
        raise SystemExit("protoc-gen-grpclib_python not found: pip install grpclib")
    return found


def generate(out: Path) -> list[Path]:
    """Write the generated modules into ``out``; return the files written."""
    protos = sorted(p.name for p in PROTOS.glob("*.proto"))
    modules = [Path(name).stem for name in protos]
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"--plugin=protoc-gen-grpclib_python={_plugin()}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpclib_python_out={out}",
        *protos,
    ]
    subprocess.run(command, check=True, cwd=PROTOS)
    written = []
    for path in sorted(out.glob("*_pb2.py*")) + sorted(out.glob("*_grpc.py")):
        text = path.read_text()
        for module in modules:
            # "import gateway_pb2" -> "from . import gateway_pb2" (package-relative)
            text = re.sub(
                rf"^import {module}_pb2$", f"from . import {module}_pb2", text, flags=re.M
            )
        path.write_text(text)
        written.append(path)
    (out / "__init__.py").write_text(HEADER)
    written.append(out / "__init__.py")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
        if args.check:
            stale = [
                f.name
                for f in files
                if not (TARGET / f.name).exists()
                or (TARGET / f.name).read_bytes() != f.read_bytes()
            ]
            if stale:
                print("out of date: " + ", ".join(stale), file=sys.stderr)
                return 1
            print("trio_gateway/_proto is up to date")
            return 0
        TARGET.mkdir(exist_ok=True)
        for f in files:
            shutil.copyfile(f, TARGET / f.name)
            print(f"wrote {(TARGET / f.name).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
