"""`edgesplit profile`: time a bundle's segments (or a model's nodes) on this device."""

from __future__ import annotations

import argparse

from edgesplit.cli.options import add_runner_option, check_output_file

DESCRIPTION = """\
Time every segment of BUNDLE on this device (median and p90 after warm-up) and, for each
--codec, the size and encode/decode time of every cut. The JSON profile feeds
`edgesplit plan`, the agent's cut="auto", and the cloud server's handshake.

Given a MODEL.onnx instead of a bundle, time every node of the whole model (for
`edgesplit partition --auto`, which picks cuts with a min-cut over the graph).
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("profile", help="per-segment (or per-node) latency on this device",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="BUNDLE|MODEL.onnx", help="a bundle directory, or an ONNX model")
    p.add_argument("-o", "--output", required=True, metavar="PROFILE.json", help="where to write the profile")
    add_runner_option(p, "auto", note=" (a model's per-node profile uses ONNX Runtime: ort-cpu or ort-cuda)")
    p.add_argument("--batch", type=int, default=1, help="samples per request (default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads (default: the runtime's; 1 = one core, like a small device)")
    p.add_argument("--warmup", type=int, default=3, help="untimed passes first (default 3)")
    p.add_argument("--repeats", type=int, default=20, help="timed passes (default 20)")
    p.add_argument("--codec", action="append", default=None, metavar="SPEC",
                   help="codec to measure at every cut (repeatable; default raw)")
    p.add_argument("--slowdown", type=float, default=1.0,
                   help="multiply every time by this, to stand in for a slower device (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from edgesplit.errors import ConfigError, UserError
    from edgesplit.planning import profile_bundle, profile_nodes

    target = Path(args.target)
    if args.slowdown <= 0:
        raise ConfigError("--slowdown must be > 0")
    check_output_file(args.output, "--output")
    if not target.exists():
        raise ConfigError(f"{target}: no such bundle directory or model file")
    progress = False if args.no_progress else None
    if target.is_file() and target.suffix == ".onnx":
        providers = {"auto": None, "ort-cpu": ["CPUExecutionProvider"],
                     "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
        if args.runner not in providers:
            raise UserError(f"a per-node profile runs ONNX Runtime: --runner auto, ort-cpu or ort-cuda, "
                            f"not {args.runner!r}")
        prof = profile_nodes(target, batch=args.batch, threads=args.threads, warmup=args.warmup,
                             repeats=args.repeats, providers=providers[args.runner], progress=progress)
        if args.slowdown != 1.0:
            prof = prof.scaled(args.slowdown)
        prof.save(args.output)
        top = sorted(range(len(prof.node_ms)), key=lambda i: -prof.node_ms[i])[:5]
        print(f"{prof.model_name}: {len(prof.node_ms)} nodes, {prof.total_ms:.3f} ms per request "
              f"(batch {prof.batch}, {prof.runner}, threads={prof.threads or 'default'}); slowest:")
        for i in top:
            print(f"  #{i:<4} {prof.node_ops[i]:<14} {prof.node_ms[i]:8.3f} ms  {prof.node_names[i]}")
        print(f"wrote {args.output}")
        return 0
    prof = profile_bundle(target, runner=args.runner, batch=args.batch, threads=args.threads,
                          warmup=args.warmup, repeats=args.repeats, codecs=tuple(args.codec or ["raw"]),
                          progress=progress)
    if args.slowdown != 1.0:
        prof = prof.scaled(args.slowdown)
    print(f"{prof.bundle_name} ({prof.bundle_id[:12]}) on {prof.device}")
    print(f"runner {prof.runner}, batch {prof.batch}, threads {prof.threads or 'default'}, "
          f"{prof.repeats} timed passes after {prof.warmup} warm-up"
          + (f", slowdown x{prof.slowdown:g}" if prof.slowdown != 1.0 else ""))
    print(f"{'segment':>8} {'median ms':>10} {'p90 ms':>10}")
    for i, (m, p) in enumerate(zip(prof.segment_ms, prof.segment_p90_ms)):
        print(f"{i:>8} {m:>10.3f} {p:>10.3f}")
    print(f"{'total':>8} {prof.total_ms:>10.3f}")
    for spec, c in prof.codecs.items():
        sizes = ", ".join(f"{b / 1024:.1f}" for b in c["bytes"])
        print(f"codec {spec}: KiB per cut 0..{len(c['bytes']) - 1}: {sizes}")
    prof.save(args.output)
    print(f"wrote {args.output}")
    return 0
