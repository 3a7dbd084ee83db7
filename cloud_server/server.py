"""`edgesplit serve` in one object: the broker, local worker processes, the HTTP admin, signal handling."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import zmq
from typing import Sequence

from edgesplit.errors import ConfigError

from cloud_server.broker import Broker
from cloud_server.config import ServerConfig

__all__ = ["Server", "parse_devices"]

log = logging.getLogger(__name__)


# Local CPU workers when --workers is not given: one per core, each with one ONNX Runtime thread
# (Server._threads), up to this many. Independent single-threaded workers are what throughput
# wants on a CPU box (no intra-op synchronisation; one worker's stall leaves the others serving),
# and one request's latency is the same as one worker's with one thread. Every worker holds its
# own copy of the weights, hence the cap: past it, workers get several threads each instead.
MAX_DEFAULT_CPU_WORKERS = 8


def cpu_count() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parse_devices(device: str, workers: int | None, cores: int | None = None) -> list[str]:
    """One entry per local worker: "cpu" x workers (default: one per core, at most
    MAX_DEFAULT_CPU_WORKERS), or one per listed GPU ("cuda:0,cuda:1")."""
    device = (device or "cpu").strip()
    if device == "cpu":
        n = min(cores or cpu_count(), MAX_DEFAULT_CPU_WORKERS) if workers is None else workers
        if n < 0:
            raise ConfigError(f"--workers must be >= 0, got {n}")
        return ["cpu"] * n
    gpus = [d.strip() for d in device.split(",") if d.strip()]
    for d in gpus:
        if not (d.startswith("cuda:") and d[5:].isdigit()):
            raise ConfigError(f"--device takes cpu or cuda:N[,cuda:M...], got {d!r}")
    if workers is not None and workers != len(gpus):
        # N workers spread over the listed GPUs, round robin
        return [gpus[i % len(gpus)] for i in range(workers)]
    return gpus


def _local(address: str) -> str:
    """The address a worker on this host connects to when the broker bound a wildcard."""
    for wild in ("0.0.0.0", "*", "[::]"):
        address = address.replace(f"://{wild}:", "://127.0.0.1:")
    return address


class Server:
    """Broker + local tail workers + HTTP admin.

    Args:
        repository: bundle directory.
        bind: edge-facing address.
        http: "HOST:PORT" for the admin endpoints, or None for none.
        devices: one entry per local worker ("cpu", "cuda:0", ...).
        config: ServerConfig.
        worker_bind: a second worker address, for workers on other hosts (local workers always use
            a free loopback port); with CURVE, only the keys in `allow_workers` get in.
        curve_secret / allow_clients: CURVE on the edge-facing socket.
        http_fallback: when the `http` port is taken, serve the admin on a free port (with a warning)
            instead of failing; `edgesplit serve` does this for its default 8080 only.
        worker_mode: "process" (isolated: a crash or SIGKILL loses only that worker) or "thread"
            (workers are threads of this process reached over inproc: a request's payload is
            never copied between processes) or "inline" (one worker run by the broker's own
            thread: no hand-off at all, the lowest overhead, but the broker reads nothing else
            while a batch computes; for short tails).
    """

    def __init__(self, repository: str | os.PathLike, bind: str = "tcp://127.0.0.1:5555",
                 http: str | None = "127.0.0.1:8080", devices: Sequence[str] = ("cpu",),
                 config: ServerConfig = ServerConfig(), worker_bind: str | None = None,
                 curve_secret: str | os.PathLike | None = None, allow_clients: str | os.PathLike | None = None,
                 worker_mode: str = "process", allow_workers: str | os.PathLike | None = None,
                 http_fallback: bool = False):
        if worker_mode not in ("process", "thread", "inline"):
            raise ConfigError(f"--worker-mode is process, thread or inline, got {worker_mode!r}")
        if worker_mode == "inline" and (len(devices) > 1 or worker_bind):
            raise ConfigError("--worker-mode inline runs one worker (in the broker's thread) and no "
                              "remote ones; use thread or process workers for several")
        self.worker_mode = worker_mode
        self.threads: list = []
        self.repository = Path(repository)
        if not self.repository.is_dir():
            raise ConfigError(f"--repository {repository} is not a directory")
        self.config = config
        self.devices = list(devices)
        self.http = http
        self.http_fallback = http_fallback  # the default port was taken: take any free one (and say so)
        self._ipc_dir = None
        local = "tcp://127.0.0.1:0"
        if sys.platform.startswith("linux") and zmq.has("ipc"):
            # Unix sockets for local workers: the same copies as loopback TCP, less protocol work
            import tempfile

            self._ipc_dir = tempfile.mkdtemp(prefix="edgesplit-")
            local = f"ipc://{self._ipc_dir}/workers"
        self.broker = Broker(config, bind, local, self.repository, curve_secret, allow_clients,
                             remote_back=worker_bind, allow_workers=allow_workers)
        self.admin = None
        self.procs: list[subprocess.Popen | None] = [None] * len(self.devices)
        self._died_at: list[float | None] = [None] * len(self.devices)
        self._generation = [0] * len(self.devices)

    def _threads(self) -> int:
        cpus = cpu_count()
        ncpu = sum(1 for d in self.devices if d == "cpu") or 1
        return max(1, cpus // ncpu)

    def _spawn(self, i: int) -> None:
        device = self.devices[i]
        cfg = self.config
        if cfg.intra_op_threads is None and device == "cpu":
            cfg = cfg.replace(intra_op_threads=self._threads())
        env = dict(os.environ)
        if device.startswith("cuda:"):
            env["CUDA_VISIBLE_DEVICES"] = device[5:]
        self._generation[i] += 1
        name = f"worker-{i}.{self._generation[i]}-{device}"  # a restarted worker gets a new name in metrics
        cmd = [sys.executable, "-m", "edgesplit", "worker", "--connect", _local(self.broker.back_address),
               "--repository", str(self.repository), "--device", device, "--name", name,
               "--config-json", json.dumps(cfg.to_json()), "--exit-with-parent"]
        self.procs[i] = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=sys.stderr)

    def start(self) -> "Server":
        front, back = self.broker.bind()
        print(f"edgesplit serve: listening on {front} (CURVE {'on' if self.broker.curve is not None else 'off'})",
              flush=True)
        if self.http:
            from cloud_server.admin import AdminServer

            try:
                self.admin = AdminServer(self.broker, self.http).start()
            except ConfigError as exc:
                if not self.http_fallback:
                    raise
                host = self.http.rpartition(":")[0]
                log.warning("%s; serving the admin endpoints on a free port instead", exc)
                self.admin = AdminServer(self.broker, f"{host}:0").start()
            print(f"edgesplit serve: admin on {self.admin.url} (health, readiness, metrics, models)", flush=True)
        print(f"edgesplit serve: workers connect to {self.broker.remote_address or back}", flush=True)
        if self.worker_mode == "thread":
            self._start_threads()
        elif self.worker_mode == "inline" and self.devices:
            self._start_inline()
        self.broker.start()
        if self.worker_mode == "process":
            for i in range(len(self.devices)):
                self._spawn(i)
        return self

    def _start_threads(self) -> None:
        import threading

        from cloud_server.worker import TailWorker

        gpus = {d for d in self.devices if d != "cpu"}
        if len(gpus) > 1:
            # CUDA_VISIBLE_DEVICES is per process, and the runtime picks device 0 of what it sees
            raise ConfigError("--worker-mode thread runs on one GPU; use process workers for several")
        if gpus:
            os.environ.setdefault("CUDA_VISIBLE_DEVICES", next(iter(gpus))[5:])
        address = self.broker.add_inproc_endpoint()
        for i, device in enumerate(self.devices):
            cfg = self.config
            if cfg.intra_op_threads is None and device == "cpu":
                cfg = cfg.replace(intra_op_threads=self._threads())
            w = TailWorker(address, self.repository, cfg, device=device, name=f"thread-{i}-{device}",
                           context=self.broker.ctx)
            t = threading.Thread(target=w.run, name=w.name, daemon=True)
            t.start()
            self.threads.append((w, t))

    def _start_inline(self) -> None:
        from cloud_server.worker import TailWorker

        device = self.devices[0]
        if device != "cpu":
            os.environ.setdefault("CUDA_VISIBLE_DEVICES", device[5:])
        cfg = self.config
        if cfg.intra_op_threads is None and device == "cpu":
            cfg = cfg.replace(intra_op_threads=self._threads())
        self.broker.add_inline_worker(TailWorker("inline://", self.repository, cfg, device=device,
                                                 name=f"inline-0-{device}", context=self.broker.ctx))

    def addresses(self) -> dict:
        """Where to reach this server: edges (front), other workers, the admin (None: off), and its pid."""
        b = self.broker
        return {"front": b.front_address, "workers": b.remote_address or b.back_address,
                "http": self.admin.url if self.admin is not None else None, "pid": os.getpid()}

    def write_ready_file(self, path: str | os.PathLike) -> None:
        """Write addresses() as JSON to `path`, atomically: a reader sees all of it or no file."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.addresses()) + "\n")
        os.replace(tmp, path)

    def wait_ready(self, timeout: float) -> bool:
        """Until every local worker announced itself and (with preload) loaded its bundles.

        A bundle a worker reported it cannot load does not hold readiness back: it is logged,
        shown with its error in /v1/models and counted in edgesplit_bundle_load_errors.
        """
        end = time.monotonic() + timeout
        n = len(self.devices)
        broker = self.broker

        def settled(w: dict) -> bool:
            # a bundle over the worker's memory budget is not loaded whole: pipeline stages serve it
            return set(w["available"]) <= set(w["loaded"]) | set(w["unfit"]) | broker.load_errors_of(w["name"])

        def placed(snap: dict) -> bool:
            return all(st["ready"] for p in snap.get("pipelines", ()) for st in p["stages"])

        def hopeless(w: dict) -> bool:  # nothing it has will ever load (errors, or over its budget unplaced)
            return set(w["available"]) <= set(w["unfit"]) | broker.load_errors_of(w["name"])

        while time.monotonic() < end:
            snap = broker.snapshot()
            ws = snap.get("workers", [])
            if len(ws) >= n and (not self.config.preload or all(settled(w) for w in ws) and placed(snap)):
                if n == 0 or snap.get("ready") or not snap.get("bundles") or all(hopeless(w) for w in ws):
                    return True
            if any(p is not None and p.poll() is not None for p in self.procs) and not self.config.restart_delay_s:
                return False
            if self.broker.join(0):  # stopped (a signal) while starting
                return False
            time.sleep(0.05)
        return False

    def supervise(self) -> int:
        """Run until the broker stops (SIGTERM/SIGINT or shutdown()); restart crashed local workers."""
        while not self.broker.join(0.2):
            now = time.monotonic()
            for i, p in enumerate(self.procs):
                if p is None or p.poll() is None or self.broker.shutting_down:
                    continue
                if self._died_at[i] is None:
                    self._died_at[i] = now
                    log.warning("local worker %d (pid %d) exited with %s", i, p.pid, p.returncode)
                if self.config.restart_delay_s and now - self._died_at[i] >= self.config.restart_delay_s:
                    self._died_at[i] = None
                    self._spawn(i)
        return self.stop()

    def stop(self) -> int:
        """Stop everything (graceful when the broker drained first); returns the exit code."""
        self.broker.shutdown()
        self.broker.join(self.config.drain_timeout_s + 10)
        end = time.monotonic() + 10
        for p in self.procs:
            if p is None:
                continue
            try:
                p.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.terminate()
                try:
                    p.wait(3)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for w, t in self.threads:
            w.stop()
            t.join(10)
        if self.admin is not None:
            self.admin.stop()
        self.broker.close()
        if self._ipc_dir is not None:
            import shutil

            shutil.rmtree(self._ipc_dir, ignore_errors=True)
        return 0

    def install_signal_handlers(self) -> None:
        def handler(signum, frame):
            if self.broker.shutting_down and signum == signal.SIGINT:
                log.warning("second interrupt: stopping now, without finishing requests in flight")
                self.broker.abort()
                return
            log.info("signal %d: stopping (finishing requests in flight)", signum)
            self.broker.shutdown()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
