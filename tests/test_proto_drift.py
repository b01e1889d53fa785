"""The checked-in stubs are exactly what scripts/gen_protos.py makes from protos/."""

import filecmp
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_match_protos(tmp_path):
    out = tmp_path / "gen"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(out)], check=True)
    checked_in = ROOT / "shared" / "proto_gen"
    fresh = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(checked_in) for p in checked_in.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert fresh == committed, "stub files differ: run `make protos`"
    drifted = [str(p) for p in fresh if not filecmp.cmp(out / p, checked_in / p, shallow=False)]
    assert not drifted, f"stubs drifted from protos/: {drifted}; run `make protos`"


_IMPORT = re.compile(r"^\s*(?:from|import)\s+([A-Za-z_]\w*)", re.MULTILINE)


def test_services_do_not_import_each_other_and_stay_small():
    services = {"compiler_service", "serving_service", "gateway", "shared"}
    heavy = {"torch", "transformers"}
    for pkg in services:
        for f in (ROOT / pkg).rglob("*.py"):
            if "proto_gen" in f.parts:
                continue
            imported = {m.group(1) for m in _IMPORT.finditer(f.read_text())}
            for other in services - {pkg, "shared"}:
                assert other not in imported, f"{f} imports {other}"
            if pkg != "compiler_service":
                assert not imported & heavy, f"{f} imports {imported & heavy}"
