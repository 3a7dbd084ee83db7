"""`edgesplit demo`: split EfficientNet-Lite0, serve its tail on loopback, cut the link, watch the agent cope.

1. partitions the shipped EfficientNet-Lite0 (edge_agent/demo_data, package data) into a temporary bundle;
2. starts a cloud server (``python -m cloud_server``) as a subprocess on 127.0.0.1, and a link
   emulator (edgesplit.netsim.LinkEmulator) between the agent and the server;
3. classifies the bundled photos: labels, where each ran, the timing breakdown;
4. cuts the link: the agent notices within two heartbeats and answers on the device;
5. restores the link: the agent reconnects and goes back to the cloud by itself.

Every exit path (errors, Ctrl-C, SIGTERM) stops the server and removes the temporary files;
on Linux the server also dies with the demo if the demo is killed outright.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

# Package data (pyproject.toml): a wheel install carries the model and the photos too.
_DATA = Path(__file__).resolve().parent / "demo_data"
DEFAULT_MODEL = _DATA / "efficientnet_lite0.onnx"
DEFAULT_PHOTOS = _DATA / "photos"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="the one-command tour: split EfficientNet-Lite0, serve it on loopback, cut the link",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="ONNX image classifier (default: the shipped one)")
    p.add_argument("--photos", default=str(DEFAULT_PHOTOS), help="folder of .jpg/.png photos")
    p.add_argument("--cut", default="2", help="cut index of the demo bundle (1..3) or 'auto' (default 2)")
    p.add_argument("--codec", default="int8+delta+zstd", help="codec for the cut tensors (default int8+delta+zstd)")
    p.add_argument("--rate", default=None, help="emulated link rate, e.g. 20mbit (default: unlimited)")
    p.add_argument("--delay", default="2ms", help="emulated one-way delay (default 2ms)")
    p.add_argument("--max-photos", type=int, default=None, help="use at most this many photos")
    p.add_argument("--server-timeout", type=float, default=40.0, help="seconds to wait for the server to start")
    p.set_defaults(func=run)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _photos(folder: Path, limit: int | None) -> list[Path]:
    from edge_agent.inputs import IMAGE_SUFFIXES
    from edgesplit.errors import UserError

    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder of photos (--photos)")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{folder}: no photos to classify ({', '.join(IMAGE_SUFFIXES)})")
    return files[:limit] if limit else files


def _check_model(model: Path) -> None:
    """The demo classifies photos: one NCHW input with 3 channels. Checked before anything starts."""
    from edgesplit.errors import EdgeSplitError, UserError
    from edgesplit.graph import load_model

    if not model.is_file():
        raise UserError(f"{model}: no such model (--model; the default is the shipped EfficientNet-Lite0)")
    try:
        graph = load_model(model, load_weights=False, check=False).graph
    except EdgeSplitError as exc:
        raise UserError(f"{model}: not a readable ONNX model ({exc})") from None
    inits = {t.name for t in graph.initializer}
    inputs = [vi for vi in graph.input if vi.name not in inits]
    dims = [d.dim_value or d.dim_param for d in inputs[0].type.tensor_type.shape.dim] if len(inputs) == 1 else []
    if len(dims) != 4 or dims[1] != 3:
        shown = ", ".join(f"{vi.name} {[d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim]}"
                          for vi in inputs)
        raise UserError(f"{model}: the demo classifies photos and needs one NCHW image input with 3 channels; "
                        f"this model takes {shown or 'no input'}")


def _row(name: str, res, labels) -> str:
    from edge_agent.inputs import top_k

    logits = next(iter(res.outputs.values()))[0]
    # class names only when the model has one score per name; else the class index
    label, prob = top_k(logits, labels if labels and len(labels) == logits.size else [], 1)[0]
    t = res.timings
    return (f"  {name:18s} {label[:22]:22s} {prob:4.2f}  {res.where:5s} cut {res.cut}  "
            f"head {t['head']:6.1f}  enc {t['encode']:4.1f}  net {t['network']:6.1f}  "
            f"tail {t['tail']:6.1f}  total {t['total']:6.1f} ms")


def run(args: argparse.Namespace) -> int:
    import tempfile

    from edge_agent import AgentConfig, EdgeAgent
    from edge_agent.inputs import find_labels, preprocess_image
    from edgesplit.errors import EdgeSplitError, UserError
    from edge_agent.local_cloud import LocalCloud, demo_bundle
    from edgesplit.netsim import LinkEmulator, parse_duration, parse_rate

    from edgesplit.deps import require

    t_start = time.monotonic()
    # Every user error is found here, before partitioning or starting a server.
    model = Path(args.model)
    _check_model(model)
    photos = _photos(Path(args.photos), args.max_photos)
    require("PIL.Image", "the demo's photos")
    if args.cut != "auto" and not (args.cut.isdigit() and 1 <= int(args.cut) <= 3):
        raise UserError(f"--cut must be 1, 2, 3 or auto, got {args.cut!r}")
    if args.max_photos is not None and args.max_photos < 1:
        raise UserError(f"--max-photos must be >= 1, got {args.max_photos}")
    rate, delay = parse_rate(args.rate), parse_duration(args.delay)
    cut = args.cut if args.cut == "auto" else int(args.cut)

    # SIGTERM takes the same way out as Ctrl-C, through every `finally` below.
    old_term = signal.signal(signal.SIGTERM, _interrupt)
    server = agent = link = None
    with tempfile.TemporaryDirectory(prefix="edgesplit-demo-") as tmp:
        try:
            repo = Path(tmp) / "repository"
            print(f"1. partitioning {model.name} ...", flush=True)
            bundle = demo_bundle(repo / "efficientnet_lite0", model)
            for c in bundle.cuts:
                print(f"   cut {c.index}: {', '.join(c.tensors)} ({c.bytes_per_sample / 1e3:.0f} kB fp32)")

            print("2. starting a cloud server on loopback ...", flush=True)
            # One core each for the "device" and the "cloud": on a small box their thread pools
            # would otherwise fight over every core and neither would look like itself.
            server = LocalCloud(repo, threads=1, timeout_s=args.server_timeout).start()
            address = server.address
            host_port = address.split("//", 1)[1]
            link = LinkEmulator(to=host_port, rate_bps=rate, delay_s=delay).start()
            print(f"   server {address}, the agent connects through a link emulator at {link.address} "
                  f"(rate {args.rate or 'unlimited'}, delay {args.delay})")
            cfg = AgentConfig(heartbeat_interval_ms=200, deadline_ms=1000, connect_timeout_ms=10000,
                              intra_op_threads=1)
            agent = EdgeAgent(bundle, [link.address], codec=args.codec, cut=cut, config=cfg)
            labels = find_labels(None, bundle)
            feeds = {p.name: {bundle.inputs[0].name: preprocess_image(p)} for p in photos}
            print(f"   device runner: {agent.runner_name} (1 thread; the cloud worker has 1 more); "
                  f"codec {args.codec}; cut {agent.cut}")
            agent.infer(next(iter(feeds.values())))  # warm the server's sessions up

            def classify(title: str) -> list:
                print(title, flush=True)
                out = []
                for name, f in feeds.items():
                    res = agent.infer(f)
                    out.append(res)
                    print(_row(name, res, labels), flush=True)
                return out

            phase1 = classify("3. classifying the photos, link up:")

            print("4. cutting the link ...", flush=True)
            detected: list[float] = []

            def watch(t_cut: float) -> None:  # when does the agent see the loss?
                while agent.link_stats().servers[0].state == "up" and time.monotonic() - t_cut < 10:
                    time.sleep(0.002)
                detected.append(time.monotonic() - t_cut)

            link.cut()
            watcher = threading.Thread(target=watch, args=(time.monotonic(),), daemon=True)
            watcher.start()
            phase2 = classify("   classifying again, link cut:")
            watcher.join()
            print(f"   (the agent declared the server down {1e3 * detected[0]:.0f} ms after the cut, "
                  f"heartbeat {cfg.heartbeat_interval_ms:.0f} ms; the request caught in flight was "
                  f"finished on the device)")

            print("5. restoring the link ...", flush=True)
            link.restore()
            t_back = time.monotonic()
            agent.wait_connected(10)
            print(f"   reconnected after {1e3 * (time.monotonic() - t_back):.0f} ms")
            phase3 = classify("   classifying again, link restored:")

            stats = agent.link_stats()
            where = [r.where for r in phase1 + phase2 + phase3]
            print(f"done in {time.monotonic() - t_start:.1f} s: {where.count('cloud')} answers from the cloud, "
                  f"{where.count('local')} on the device, none lost; "
                  f"rtt {f'{stats.rtt_ms:.2f} ms' if stats.rtt_ms is not None else 'n/a'}; "
                  f"agent counters (with the warm-up request) {dict(sorted(stats.counters.items()))}")
            ok = (all(r.where == "cloud" for r in phase1) and all(r.where == "local" for r in phase2[1:])
                  and phase3[-1].where == "cloud")
            if not ok:
                print("   note: the run did not follow the expected cloud / local / cloud pattern", file=sys.stderr)
            return 0 if ok else 2
        except KeyboardInterrupt:
            print("interrupted; cleaning up", file=sys.stderr)
            return 130
        except EdgeSplitError as exc:
            if isinstance(exc, UserError):
                raise
            print(f"edgesplit demo: error: {exc}", file=sys.stderr)
            return 1
        finally:
            if agent is not None:
                agent.close()
            if link is not None:
                link.close()
            if server is not None:
                server.stop()
            signal.signal(signal.SIGTERM, old_term)
