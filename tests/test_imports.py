"""The core imports and every CLI command answers -h with only the core dependencies.

Optional packages are hidden with an import hook in a fresh interpreter, the way a bare CPU
box without them behaves (Polygraphy's tests/mod/test_dependencies.py).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

OPTIONAL = ["torch", "tensorrt", "cuda", "aiohttp", "prometheus_client", "matplotlib", "PIL",
            "onnxruntime_gpu", "hypothesis", "opentelemetry"]

HIDE = textwrap.dedent(f"""
    import sys, importlib.abc
    class Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {OPTIONAL!r}:
                raise ImportError(f"{{name}} hidden by test_imports")
    sys.meta_path.insert(0, Hide())
""")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HIDE + textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120)


def test_every_module_imports_without_optional_dependencies():
    proc = _run("""
        import importlib, pkgutil
        import edgesplit, edge_agent, cloud_server
        assert "onnxruntime" not in sys.modules, "import edgesplit must not load onnxruntime"
        failed = []
        for pkg in (edgesplit, edge_agent, cloud_server):
            for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
                if mod.name.endswith("__main__"):
                    continue
                try:
                    importlib.import_module(mod.name)
                except Exception as exc:
                    failed.append(f"{mod.name}: {exc!r}")
        print("\\n".join(failed))
        sys.exit(1 if failed else 0)
    """)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _commands() -> list[str]:
    from importlib.metadata import entry_points

    return sorted(ep.name for ep in entry_points(group="edgesplit.commands"))


def test_help_lists_every_command():
    proc = _run("from edgesplit.cli import main; sys.exit(main(['--help']))")
    assert proc.returncode == 0, proc.stderr
    for name in _commands():
        assert name in proc.stdout
    assert "unavailable" not in proc.stdout, proc.stdout


@pytest.mark.parametrize("command", _commands())
def test_command_help_without_optional_dependencies(command):
    proc = _run(f"from edgesplit.cli import main; sys.exit(main([{command!r}, '-h']))")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "usage: edgesplit" in proc.stdout
