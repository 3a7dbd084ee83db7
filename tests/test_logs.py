"""Log output: text for people, one JSON object per line for log pipelines, the same in child processes."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

import pytest

from edgesplit.errors import ConfigError
from edgesplit.logs import configure


@pytest.fixture(autouse=True)
def _restore_logging(monkeypatch):
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    monkeypatch.delenv("EDGESPLIT_LOG_FORMAT", raising=False)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_the_extra_fields():
    buf = io.StringIO()
    assert configure(1, "json", stream=buf) == "json"
    logging.getLogger("cloud_server").info("worker %s joined", "w1", extra={"bundle": "abc123", "batch": 4})
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("edge_agent").exception("failed\nover two lines")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2  # a message with a newline and a traceback still make one line each
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "worker w1 joined" and first["level"] == "info" and first["logger"] == "cloud_server"
    assert first["bundle"] == "abc123" and first["batch"] == 4 and first["time"].endswith("Z")
    assert "ValueError: boom" in second["exception"]


def test_text_by_default_and_a_bad_format_is_refused():
    buf = io.StringIO()
    assert configure(0, None, stream=buf) == "text"
    logging.getLogger("x").warning("plain")
    assert buf.getvalue().strip().endswith("x WARNING: plain")
    with pytest.raises(ConfigError, match="choose text or json"):
        configure(0, "xml")


def test_the_format_reaches_child_processes():
    code = ("import subprocess, sys\n"
            "from edgesplit.logs import configure\n"
            "configure(0, 'json')\n"
            "subprocess.run([sys.executable, '-c', 'import logging; from edgesplit.logs import configure; "
            "configure(); logging.getLogger(\"child\").warning(\"hi\")'], check=True)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stderr.strip().splitlines()[-1])["logger"] == "child"
    bad = subprocess.run([sys.executable, "-m", "edgesplit", "--log-format", "xml", "inspect", "m.onnx"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
