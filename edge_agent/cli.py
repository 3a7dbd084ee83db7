"""`edgesplit run`: run a bundle through an edge agent on one input file and print the answer."""

from __future__ import annotations

import argparse


def register_run(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="run a bundle on an input through the edge agent (head here, tail in the cloud)",
        description="Run BUNDLE on one input: the head on this device, the tail on --server "
                    "(or locally when no server answers). Prints the outputs (top-5 labels for an "
                    "ImageNet classifier) and the timing breakdown.")
    p.add_argument("bundle", metavar="BUNDLE", help="bundle directory (edgesplit partition -o ...)")
    p.add_argument("--server", action="append", default=[], metavar="tcp://HOST:PORT",
                   help="cloud broker address (repeat for several)")
    p.add_argument("--input", required=True, metavar="FILE", help=".npy, .npz, .jpg or .png")
    p.add_argument("--repeat", type=int, default=1, metavar="N", help="run N times and print the median timings")
    p.add_argument("--cut", default="auto", help="cut index (segments [0, cut) run here) or 'auto' (default)")
    p.add_argument("--codec", default="int8+delta+zstd", help="codec for the cut tensors (default int8+delta+zstd)")
    p.add_argument("--runner", default="auto", help="device backend: auto, ort-cpu, ort-cuda, ort-trt, trt")
    p.add_argument("--deadline-ms", type=float, default=None, help="per-request deadline (default: AgentConfig's)")
    p.add_argument("--fallback", choices=("local", "error", "wait"), default="local",
                   help="when the cloud cannot answer (default local)")
    p.add_argument("--connect-timeout-ms", type=float, default=2000.0,
                   help="wait this long for a server at start (default 2000)")
    p.add_argument("--labels", default=None, metavar="FILE",
                   help="class names, one per line (default: the shipped ImageNet labels when the output has 1000 classes)")
    p.set_defaults(func=run)


def _parse_cut(text: str):
    from edgesplit.errors import ConfigError

    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--cut must be an integer or 'auto', got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from edge_agent import AgentConfig, EdgeAgent
    from edge_agent.inputs import describe_outputs, find_labels, format_timings, load_feeds
    from edgesplit.bundle import Bundle
    from edgesplit.errors import ConfigError

    if args.repeat < 1:
        raise ConfigError("--repeat must be >= 1")
    bundle = Bundle.load(args.bundle)
    feeds = load_feeds(args.input, bundle)
    labels = find_labels(args.labels, bundle)
    cfg = AgentConfig(fallback=args.fallback, connect_timeout_ms=args.connect_timeout_ms,
                      **({"deadline_ms": args.deadline_ms} if args.deadline_ms else {}))
    # The agent profiles the device and waits for a server first: say so before that wait.
    print(f"edgesplit run: {bundle.name}, {args.input}; profiling the device and connecting to "
          f"{', '.join(args.server) or '(no server: local only)'} ...", flush=True)
    with EdgeAgent(bundle, args.server, runner=args.runner, codec=args.codec, cut=_parse_cut(args.cut),
                   config=cfg) as agent:
        print(f"bundle {bundle.name} ({bundle.id[:12]}), {bundle.num_segments} segments; "
              f"device runner {agent.runner_name}; codec {args.codec}; "
              f"servers {', '.join(args.server) or '(none: local only)'}")
        results = []
        for i in range(args.repeat):
            res = agent.infer(feeds, deadline_ms=args.deadline_ms)
            results.append(res)
            if args.repeat <= 10 or i in (0, args.repeat - 1):
                why = f" ({res.reason})" if res.reason else ""
                print(f"[{i + 1}/{args.repeat}] {res.where:5s}{why} cut {res.cut}  {format_timings(res.timings)}")
        for line in describe_outputs(results[-1].outputs, labels):
            print(line)
        if args.repeat > 1:
            med = {k: float(np.median([r.timings.get(k, 0.0) for r in results]))
                   for k in ("head", "encode", "network", "tail", "total")}
            where = {w: sum(r.where == w for r in results) for w in ("cloud", "local")}
            print(f"median of {args.repeat}: {format_timings(med)}  (cloud {where['cloud']}, local {where['local']})")
        stats = agent.link_stats()
        rtt = f"{stats.rtt_ms:.2f} ms" if stats.rtt_ms is not None else "n/a"
        bw = f"{stats.bandwidth_bps / 1e6:.1f} Mbit/s" if stats.bandwidth_bps else "n/a"
        print(f"link: rtt {rtt}, bandwidth {bw}")
    return 0
