"""`edgesplit serve` (broker + workers + HTTP admin) and `edgesplit worker` (one more worker, any host)."""

from __future__ import annotations

import argparse

__all__ = ["register_serve", "register_worker", "build_serve_parser", "run_serve", "run_worker"]

DEFAULT_HTTP = "127.0.0.1:8080"


def _config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tuning (ServerConfig)")
    g.add_argument("--max-batch", type=int, default=None, help="largest dynamic batch (default 8)")
    g.add_argument("--max-request-batch", type=int, default=None,
                   help="largest batch one request may carry (default 32768; sizes the socket bound)")
    g.add_argument("--max-queue-delay-ms", type=float, default=None,
                   help="how long a worker waits to fill a batch (default 2)")
    g.add_argument("--heartbeat-ms", type=float, default=None,
                   help="broker <-> worker heartbeat interval (default 500); 3 missed = worker lost")
    g.add_argument("--capacity", type=int, default=None, help="requests in flight per worker (default 16)")
    g.add_argument("--max-pending", type=int, default=None,
                   help="requests waiting in the broker before 'busy' (default 256)")
    g.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads per worker")
    g.add_argument("--runner", default=None, help="runner kind: auto, ort-cpu, ort-cuda, ort-trt, trt")
    g.add_argument("--no-preload", action="store_true", help="load bundles on first use instead of at start")
    g.add_argument("--allow-non-finite", action="store_true",
                   help="accept NaN and infinity in float inputs (default: refused with bad_request)")
    g.add_argument("--worker-memory", metavar="SIZE", default=None,
                   help="segment weights one worker may hold, e.g. 40MB or 2GiB (default: no limit); a bundle "
                        "that fits no worker is split over several as pipeline stages")
    g.add_argument("--stages", type=int, default=None, metavar="N",
                   help="split every bundle into at least N pipeline stages on separate workers (default: as "
                        "many as --worker-memory needs)")
    g.add_argument("--config", metavar="FILE.toml", default=None,
                   help="settings file: its [server] table sets any ServerConfig field (docs/configuration.md); "
                        "EDGESPLIT_SERVER_* variables override it, and these flags override both")
    g.add_argument("--config-json", default=None, help=argparse.SUPPRESS)


def _config(args):
    import json

    from cloud_server.config import ServerConfig
    from edgesplit import settings
    from edgesplit.errors import ConfigError

    changes = {}
    for arg, field, scale in (("max_batch", "max_batch", 1), ("max_request_batch", "max_request_batch", 1), ("max_queue_delay_ms", "max_queue_delay_ms", 1),
                              ("heartbeat_ms", "heartbeat_interval_s", 1e-3), ("capacity", "worker_capacity", 1),
                              ("max_pending", "max_pending", 1), ("threads", "intra_op_threads", 1),
                              ("runner", "runner", 1), ("stages", "pipeline_stages", 1)):
        v = getattr(args, arg, None)
        if v is not None:
            changes[field] = v * scale if scale != 1 else v
    if getattr(args, "worker_memory", None) is not None:
        changes["worker_memory_bytes"] = settings.parse_size(args.worker_memory, "--worker-memory")
    if getattr(args, "no_preload", False):
        changes["preload"] = False
    if getattr(args, "allow_non_finite", False):
        changes["allow_non_finite"] = True
    if args.config_json:  # a worker process started by `serve`: the parent's settings, already resolved
        try:
            base = ServerConfig.from_json(json.loads(args.config_json))
        except ValueError as exc:
            raise ConfigError(f"--config-json: {exc}") from None
        return settings.load(ServerConfig, section="server", env={}, overrides=changes, base=base)
    # defaults < --config FILE [server] < EDGESPLIT_SERVER_* < the flags above
    return settings.load(ServerConfig, getattr(args, "config", None), section="server", overrides=changes)


def build_serve_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--repository", required=True, metavar="DIR",
                   help="folder of bundle directories (or one bundle directory)")
    p.add_argument("--bind", default="tcp://127.0.0.1:5555",
                   help="address edges connect to (default tcp://127.0.0.1:5555; port 0 = any free port)")
    p.add_argument("--http", default=None,
                   help="HOST:PORT of /healthz /readyz /metrics /v1/models (default 127.0.0.1:8080, or a "
                        "free port when 8080 is taken; port 0 = any; 'off' = none)")
    p.add_argument("--workers", type=int, default=None,
                   help="local CPU worker processes (default: one per core, at most 8, with one ONNX Runtime "
                        "thread each; --worker-mode inline: 1; with --device cuda:..., one per GPU)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda:0[,cuda:1...] for one worker per GPU")
    p.add_argument("--worker-bind", default=None, metavar="ADDR",
                   help="also take workers from other hosts (`edgesplit worker`) on this address; local "
                        "workers use a free loopback port")
    p.add_argument("--worker-mode", choices=("process", "thread", "inline"), default="process",
                   help="local workers as processes (isolated; default), as threads of the server "
                        "(payloads never cross a process boundary), or inline: one worker run by the "
                        "broker's own thread (no hand-off: lowest overhead; for short tails)")
    p.add_argument("--curve-secret", metavar="FILE", help="server key file (NAME.key_secret): CURVE on --bind")
    p.add_argument("--allow-clients", metavar="DIR", help="folder of allowed client public keys (*.key)")
    p.add_argument("--allow-workers", metavar="DIR",
                   help="folder of public keys of workers allowed on --worker-bind (with --curve-secret)")
    p.add_argument("--ready-file", metavar="PATH",
                   help="when ready, write a JSON file (front, workers and http addresses, pid) here, atomically")
    _config_args(p)
    p.set_defaults(func=run_serve)
    return p


def register_serve(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run the cloud pool: broker, tail workers, HTTP admin",
                              description="Serve bundle tails to edge agents: a ZeroMQ broker, local tail "
                                          "workers and the HTTP admin, in one command.")
    build_serve_parser(p)


def register_worker(subparsers) -> None:
    p = subparsers.add_parser("worker", help="add a tail worker to a running broker (any host)",
                              description="One tail worker: connects to a broker's worker address and runs "
                                          "the tails of the bundles in --repository.")
    p.add_argument("--connect", required=True, action="append", metavar="tcp://BROKER:PORT",
                   help="a broker's worker address; repeat it to serve several brokers at once (capacity split "
                        "between them)")
    p.add_argument("--repository", required=True, metavar="DIR", help="folder of bundles this worker can load")
    p.add_argument("--device", default="cpu", help="cpu or cuda:N")
    p.add_argument("--name", default=None, help="worker name in metrics (default host-pid)")
    p.add_argument("--curve-server-key", metavar="FILE", help="the broker's public key file, when it uses CURVE")
    p.add_argument("--curve-secret", metavar="FILE", help="this worker's key file (NAME.key_secret)")
    p.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    _config_args(p)
    p.set_defaults(func=run_worker)


def run_serve(args) -> int:
    import logging
    import sys

    from pathlib import Path

    from cloud_server.server import Server, parse_devices

    log = logging.getLogger("cloud_server")
    if log.getEffectiveLevel() > logging.INFO and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    cfg = _config(args)
    if args.ready_file:
        import os

        from edgesplit.errors import ConfigError

        folder = os.path.dirname(os.path.abspath(args.ready_file))
        if not os.path.isdir(folder):
            raise ConfigError(f"--ready-file {args.ready_file}: {folder} is not a directory")
    if args.http is None:
        http = DEFAULT_HTTP
    else:
        http = None if args.http.lower() in ("off", "none", "") else args.http
    workers = 1 if args.workers is None and args.worker_mode == "inline" else args.workers  # inline serves alone
    server = Server(args.repository, bind=args.bind, http=http, devices=parse_devices(args.device, workers),
                    config=cfg, worker_bind=args.worker_bind, curve_secret=args.curve_secret,
                    allow_clients=args.allow_clients, worker_mode=args.worker_mode,
                    allow_workers=args.allow_workers, http_fallback=args.http is None)
    server.install_signal_handlers()
    server.start()
    ok = server.wait_ready(cfg.startup_timeout_s)
    snap = server.broker.snapshot()
    extra = f", admin {server.admin.url}" if server.admin else ""
    if server.broker.join(0):  # stopped while starting
        return server.stop()
    if not ok:
        print(f"edgesplit serve: warning: not every worker came up within {cfg.startup_timeout_s:.0f} s",
              file=sys.stderr, flush=True)
    if args.ready_file:  # before the line: whoever reads the line finds the file
        server.write_ready_file(args.ready_file)
    print(f"edgesplit serve: ready on {server.broker.front_address}: {len(snap.get('workers', []))} workers, "
          f"{len(snap.get('bundles', []))} bundles{extra}", flush=True)
    try:
        return server.supervise()
    finally:
        if args.ready_file:  # a file left behind would name a server that is gone
            Path(args.ready_file).unlink(missing_ok=True)


def run_worker(args) -> int:
    import os
    import signal

    from cloud_server.worker import TailWorker
    from edgesplit.errors import ConfigError

    if args.exit_with_parent:
        _die_with_parent()
    if not os.path.isdir(args.repository):
        raise ConfigError(f"--repository {args.repository}: no such directory")
    # A long-running command says at once that it started and what it is doing.
    print(f"edgesplit worker: pid {os.getpid()}, device {args.device}, repository {args.repository}, "
          f"connecting to {', '.join(args.connect)}", flush=True)
    if len(args.connect) == 1:
        worker = TailWorker(args.connect[0], args.repository, _config(args), device=args.device, name=args.name,
                            curve_server_key=args.curve_server_key, curve_secret=args.curve_secret)
    else:
        from cloud_server.multi import MultiWorker

        worker = MultiWorker(args.connect, args.repository, _config(args), device=args.device, name=args.name,
                             curve_server_key=args.curve_server_key, curve_secret=args.curve_secret)

    def handler(signum, frame):
        worker.stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return worker.run()


def _die_with_parent() -> None:
    """Linux: get SIGTERM (a graceful stop) when the `serve` process that started us dies."""
    import signal
    import sys

    if sys.platform != "linux":
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
