"""Generate Python stubs for protos/ into shared/proto_gen/ (the only way stubs are made).

Usage: python scripts/gen_protos.py [--out DIR]

protoc writes imports as `from llamaship.x.v1 import ...`; they are rewritten to the package's
real location (`shared.proto_gen.llamaship...`). tests/test_proto_drift.py regenerates into a
temporary folder and fails when the checked-in stubs differ.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
DEFAULT_OUT = ROOT / "shared" / "proto_gen"
PACKAGE = "shared.proto_gen"


def generate(out: Path) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    protos = sorted(PROTOS.rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = sorted(p for p in out.rglob("*") if p.is_file())
    for path in written:
        text = path.read_text()
        text = re.sub(r"^from llamaship\.", f"from {PACKAGE}.llamaship.", text, flags=re.M)
        text = re.sub(r"^import llamaship\.", f"import {PACKAGE}.llamaship.", text, flags=re.M)
        path.write_text(text)
    for folder in [out, *sorted(p for p in out.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").write_text("")
    return sorted(p for p in out.rglob("*") if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    files = generate(args.out)
    print(f"generated {len(files)} files under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
