"""The README's Python SDK snippet runs as written, against a local server.

The snippet follows the README's "typical session": `repo/effnet` partitioned as that session
says (its --cut arguments are read from the README), and a server on tcp://127.0.0.1:5555. The
test makes both in a temporary directory and runs the snippet there, unchanged, when port 5555
is free; on a box where something else holds 5555 (parallel test runs) the server binds a
random port and that address, the snippet's only placeholder, is replaced by it.
"""

from __future__ import annotations

import contextlib
import io
import re
import socket
from pathlib import Path

import pytest

from edge_agent.inputs import DEMO_DATA
from test_agent_support import RealCloud

README = Path(__file__).resolve().parents[1] / "README.md"
ADDRESS = "tcp://127.0.0.1:5555"


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def sdk_snippet() -> str:
    (code,) = re.findall(r"```python\n(.*?)```", _section("Python SDK"), flags=re.S)
    return code


def session_cuts() -> list[str]:
    session = _section("Command line")
    partition = re.search(r"edgesplit partition (\S+)((?:(?!edgesplit ).)*?)-o repo/effnet", session, flags=re.S)
    assert partition, "the README's typical session partitions repo/effnet"
    return re.findall(r"--cut (\S+)", partition.group(2))


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.slow
def test_the_python_sdk_snippet_runs_as_written(tmp_path, monkeypatch):
    from edgesplit.graph import partition

    code = sdk_snippet()
    assert "await " not in code.replace("return await", "").split("async def")[0], "no top-level await"
    assert ADDRESS in code
    cuts = session_cuts()
    assert len(cuts) == 2
    partition(DEMO_DATA / "efficientnet_lite0.onnx", cuts, tmp_path / "repo" / "effnet")
    bind = ADDRESS if port_free(5555) else "tcp://127.0.0.1:0"
    with RealCloud(tmp_path / "repo", bind=bind) as cloud:
        if cloud.address != ADDRESS:
            code = code.replace(ADDRESS, cloud.address)
        monkeypatch.chdir(tmp_path)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md (Python SDK)", "exec"), {"__name__": "__readme__"})  # noqa: S102
    printed = out.getvalue()
    assert "espresso" in printed, printed
    lines = printed.splitlines()
    assert len(lines) == 4 and all(w in ("cloud", "local") for w in lines[1:3]), printed
    assert "LinkStats(" in lines[3]
