"""What the benchmarks share: the machine they ran on, tiny bundles, a server child, CPU accounting.

Run any benchmark as `python benchmarks/NAME.py`: Python puts benchmarks/ on sys.path, so they
import this module as `common` with no path edits (edgesplit itself comes from the installed
package, e.g. the `.ci/venv` environment).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from edgesplit.bundle import Cut, TensorSpec, write_bundle

REPO = Path(__file__).resolve().parents[1]

__all__ = ["REPO", "machine", "load_average", "free_port", "echo_bundle", "mlp_bundle", "Serve",
           "process_tree", "cpu_seconds"]


def machine(*extra: str) -> str:
    """This machine, the load average now and the versions that matter for the numbers."""
    import onnxruntime
    import zmq
    import zstandard

    from edgesplit.planning import device_description

    parts = [device_description(), load_average(), f"numpy {np.__version__}",
             f"onnxruntime {onnxruntime.__version__}", f"libzmq {zmq.zmq_version()}", f"pyzmq {zmq.__version__}",
             f"zstandard {zstandard.__version__}", *extra]
    return ", ".join(parts)


def load_average() -> str:
    try:
        return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"


def free_port() -> int:
    """A free TCP port on loopback (for a child that cannot bind port 0 itself)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(nodes, inputs, outputs, inits=(), opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def echo_bundle(out: Path, elems: int, small_reply: bool):
    """Identity head; tail = Identity (1 MB back) or ReduceMax (4 bytes back): near-zero compute."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", elems])
    h = helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", elems])
    ydim = 1 if small_reply else elems
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", ydim])
    head = _model([helper.make_node("Identity", ["x"], ["h"])], [x], [h])
    tail = (_model([helper.make_node("ReduceMax", ["h"], ["y"], keepdims=1, axes=[1])], [h], [y], opset=13)
            if small_reply else _model([helper.make_node("Identity", ["h"], ["y"])], [h], [y]))
    hs = TensorSpec("h", "float32", ("N", elems))
    model = {"name": "echo-small" if small_reply else "echo", "source_sha256": "0" * 64,
             "inputs": [TensorSpec("x", "float32", ("N", elems)).to_json()],
             "outputs": [TensorSpec("y", "float32", ("N", ydim)).to_json()]}
    return write_bundle(out, model, [(head, ["x"], ["h"]), (tail, ["h"], ["y"])],
                        [Cut(1, ("h",), hs.bytes_per_sample(), (hs,))])


def mlp_bundle(out: Path, width: int = 256, depth: int = 8):
    """A batchable tail: depth x (MatMul width x width + Tanh); small per-sample compute, so the
    per-call overhead that batching amortises is visible, as in a classifier head."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])
    h = helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])
    head = _model([helper.make_node("Identity", ["x"], ["h"])], [x], [h])
    nodes, inits, prev = [], [], "h"
    for i in range(depth):
        inits.append(numpy_helper.from_array((rng.standard_normal((width, width)) / np.sqrt(width))
                                             .astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]))
        prev = "y" if i == depth - 1 else f"t{i}"
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [prev]))
    tail = _model(nodes, [h], [y], inits)
    hs = TensorSpec("h", "float32", ("N", width))
    model = {"name": f"mlp{width}x{depth}", "source_sha256": "0" * 64,
             "inputs": [TensorSpec("x", "float32", ("N", width)).to_json()],
             "outputs": [TensorSpec("y", "float32", ("N", width)).to_json()]}
    return write_bundle(out, model, [(head, ["x"], ["h"]), (tail, ["h"], ["y"])],
                        [Cut(1, ("h",), hs.bytes_per_sample(), (hs,))])


class Serve:
    """`python -m cloud_server` with the given options, on free loopback ports (`http`: with its
    admin endpoints, read by `models()`)."""

    def __init__(self, repo: Path, workers: int, *extra: str, pythonpath: str | None = None, http: bool = False):
        self.http = f"127.0.0.1:{free_port()}" if http else None
        cmd = [sys.executable, "-m", "cloud_server", "--repository", str(repo), "--bind", "tcp://127.0.0.1:0",
               "--http", self.http or "off", "--workers", str(workers), *extra]
        env = None
        if pythonpath:  # another version of the packages (its cwd must not shadow them)
            env = dict(os.environ, PYTHONPATH=os.path.abspath(pythonpath))
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     cwd=os.path.abspath(pythonpath) if pythonpath else REPO, env=env)
        self.address = None
        for line in self.proc.stdout:
            m = re.search(r"listening on (\S+)", line)
            if m:
                self.address = m.group(1)
            if "ready on" in line:
                break
        if self.address is None:
            raise RuntimeError("the server did not start")

    def models(self) -> dict:
        """GET /v1/models (needs http=True)."""
        import json
        import urllib.request

        with urllib.request.urlopen(f"http://{self.http}/v1/models", timeout=10) as r:
            return json.loads(r.read())

    def close(self):
        self.proc.terminate()
        self.proc.wait(30)


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (Linux /proc)."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes: what the server spends, whatever else runs."""
    tck = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in pids:
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / tck
