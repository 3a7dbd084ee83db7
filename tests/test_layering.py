"""The layering of DESIGN.md, checked by tools: import-linter's contracts, and no private names across packages."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    proc = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "3 kept, 0 broken" in proc.stdout


def _private_imports(path: Path) -> list[str]:
    """`edgesplit.x._y` modules and `_names` imported from edgesplit by the file at `path`."""
    found = []
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "edgesplit":
                continue
            if any(p.startswith("_") for p in parts):
                found.append(f"{where}:{node.lineno}: {node.module}")
            found += [f"{where}:{node.lineno}: {node.module}.{a.name}"
                      for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Import):
            found += [f"{where}:{node.lineno}: {a.name}" for a in node.names
                      if a.name.split(".")[0] == "edgesplit" and any(p.startswith("_") for p in a.name.split("."))]
    return found


def test_nothing_outside_the_core_imports_its_private_names():
    files = [p for d in ("edge_agent", "cloud_server", "examples", "benchmarks", "models", "tests")
             for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 50
    bad = [hit for p in files for hit in _private_imports(p)]
    assert not bad, "private edgesplit names imported from outside the core:\n" + "\n".join(bad)


def test_the_private_scan_sees_a_private_import(tmp_path):
    p = tmp_path / "probe.py"
    p.write_text("from edgesplit.codecs._quant import pack_bits\nfrom edgesplit.deps import _EXTRAS\nimport edgesplit.protocol\n")
    assert len(_private_imports(p)) == 2
