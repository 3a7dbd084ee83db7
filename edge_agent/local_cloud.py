"""A cloud server on loopback for demos and examples: `python -m cloud_server` as a child process.

    with LocalCloud(repository) as cloud:          # a folder of bundles
        agent = EdgeAgent(bundle, [cloud.address])

The child is stopped on every exit path; on Linux it is also killed if this process dies
outright (PR_SET_PDEATHSIG), so no server is ever left behind. edge_agent never imports
cloud_server: it only runs it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

from edgesplit.errors import EdgeSplitError

__all__ = ["LocalCloud", "demo_bundle"]

# Package data (pyproject.toml), so a wheel install has it too.
DEMO_MODEL = Path(__file__).resolve().parent / "demo_data" / "efficientnet_lite0.onnx"
# Candidate cuts of EfficientNet-Lite0 (`edgesplit inspect`): after block 3 (125 kB fp32),
# after block 11 (38 kB), and the pooled features (5 kB).
DEMO_CUTS = (4, 12, 17)


class LocalCloud:
    """Runs a cloud server subprocess on 127.0.0.1 and knows its address once it is ready.

    Args:
        repository: the folder of bundles to serve (or one bundle directory).
        workers: tail worker processes.
        bind: the ZeroMQ address to bind (default: a random loopback port).
        http: HOST:PORT for the server's admin HTTP (/healthz, /metrics, ...), or "off".
        threads: ONNX Runtime intra-op threads per worker (None: the server's default).
        extra_args: more command-line options for the server (e.g. CURVE keys).
        timeout_s: how long start() waits for the server to be ready (its --ready-file).
    """

    def __init__(self, repository: str | os.PathLike, workers: int = 1, bind: str = "tcp://127.0.0.1:0",
                 http: str = "off", threads: int | None = None, extra_args: Sequence[str] = (),
                 timeout_s: float = 60.0):
        self.repository = Path(repository)
        self.workers = workers
        self.bind = bind
        self.http = http
        self.threads = threads
        self.extra_args = list(extra_args)
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen | None = None
        self.address: str | None = None
        self.info: dict = {}  # the server's ready file: front, workers, http, pid
        self.lines: list[str] = []
        self._dir: tempfile.TemporaryDirectory | None = None

    def start(self) -> "LocalCloud":
        self._dir = tempfile.TemporaryDirectory(prefix="edgesplit-cloud-")
        ready_file = Path(self._dir.name) / "ready.json"
        cmd = [sys.executable, "-m", "cloud_server", "--repository", str(self.repository),
               "--bind", self.bind, "--workers", str(self.workers), "--http", self.http,
               "--ready-file", str(ready_file),
               *(["--threads", str(self.threads)] if self.threads else []), *self.extra_args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                     preexec_fn=_die_with_parent if sys.platform == "linux" else None)

        def reader():  # keeps the pipe drained, and the lines for an error message
            for line in self.proc.stdout:
                self.lines.append(line.rstrip())

        threading.Thread(target=reader, name="local-cloud-output", daemon=True).start()
        end = time.monotonic() + self.timeout_s
        # The server writes the file atomically once it is ready: it exists whole or not at all.
        while not ready_file.exists() and self.proc.poll() is None and time.monotonic() < end:
            time.sleep(0.05)
        if self.proc.poll() is None and ready_file.exists():
            self.info = json.loads(ready_file.read_text())
            self.address = self.info["front"]
            return self
        self.stop()
        tail = "\n  ".join(self.lines[-15:])
        raise EdgeSplitError(f"the cloud server did not start ({' '.join(cmd)}):\n  {tail}")

    def kill(self) -> None:
        """SIGKILL the server (to show what the agent does when a server dies)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> "LocalCloud":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _die_with_parent() -> None:  # in the child, before exec (Linux)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def demo_bundle(out: str | os.PathLike, model: str | os.PathLike = DEMO_MODEL, cuts: Sequence[int] = DEMO_CUTS):
    """Partition `model` at the given candidate cuts (chain order) into the bundle directory `out`."""
    from edgesplit.graph import candidate_cuts, partition

    cands = candidate_cuts(model)
    picks = [c for c in cands if c.index in cuts] or cands[:: max(1, len(cands) // 3)][:3]
    return partition(model, [list(c.tensors) for c in picks], out)
