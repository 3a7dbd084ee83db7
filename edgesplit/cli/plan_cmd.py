"""`edgesplit plan`: expected latency per cut and bandwidth, the chosen cut, and a plot.

Also home of the `partition --auto` options (the min-cut over the whole graph), which
edgesplit.cli.partition_cmd wires in with :func:`add_auto_arguments` / :func:`auto_cuts`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

DESCRIPTION = """\
Predict the latency of every cut of BUNDLE over a range of link bandwidths, from a device
profile and a cloud profile (`edgesplit profile BUNDLE -o ...` on each side), and show which
cut is best where:

  latency(k) = edge segments + encode + bytes(codec)/bandwidth + RTT + cloud queue
               + cloud segments + decode
"""


def parse_bandwidths(text: str, points: int = 7) -> list[float]:
    """ "1mbit:100mbit" (log-spaced `points`), "1mbit,10mbit" (a list) or "10mbit" -> bit/s."""
    from edgesplit.errors import ConfigError
    from edgesplit.netsim import parse_rate

    def one(s: str) -> float:
        v = parse_rate(s)
        if v is None:
            raise ConfigError(f"a bandwidth must be finite, got {s!r}")
        return v

    if ":" in text:
        lo_s, _, hi_s = text.partition(":")
        lo, hi = sorted((one(lo_s), one(hi_s)))
        if points < 2 or lo == hi:
            return [lo] if lo == hi else [lo, hi]
        return [lo * (hi / lo) ** (i / (points - 1)) for i in range(points)]
    return [one(s) for s in text.split(",") if s.strip()]


def _fmt_bw(bps: float) -> str:
    from edgesplit.netsim import format_rate

    if bps >= 1e6:
        return f"{bps / 1e6:.3g}mbit"
    return format_rate(bps)


# -- partition --auto ----------------------------------------------------------------------------
def add_auto_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("choosing cuts automatically (min-cut over the whole graph, DADS)")
    g.add_argument("--auto", action="store_true",
                   help="pick the cuts that are optimal somewhere in --bandwidths instead of --cut")
    g.add_argument("--edge-profile", metavar="E.json",
                   help="per-node profile of MODEL on the device (`edgesplit profile MODEL.onnx -o E.json`)")
    g.add_argument("--cloud-profile", metavar="C.json", help="per-node profile of MODEL on the cloud")
    g.add_argument("--bandwidths", default="1mbit:100mbit", metavar="LO:HI",
                   help="bandwidth range to cover (default 1mbit:100mbit)")
    g.add_argument("--rtt", default="20ms", help="round trip assumed (default 20ms)")
    g.add_argument("--auto-codec", default="raw", metavar="SPEC", help="codec the edge will send with (default raw)")
    g.add_argument("--max-cuts", type=int, default=None, help="keep at most this many cuts")


def auto_cuts(args, out=None) -> list[list[str]]:
    """The cuts `partition --auto` makes; prints what it chose."""
    from edgesplit.errors import ConfigError, CutError
    from edgesplit.netsim import parse_duration
    from edgesplit.planning import NodeProfile
    from edgesplit.planning.mincut import SplitProblem, choose_cuts

    out = out or sys.stdout
    if args.cut:
        raise ConfigError("give either --cut or --auto, not both")
    if not args.edge_profile or not args.cloud_profile:
        raise ConfigError("--auto needs --edge-profile and --cloud-profile (per-node profiles of the model)")
    edge = NodeProfile.load(args.edge_profile)
    cloud = NodeProfile.load(args.cloud_profile)
    bws = parse_bandwidths(args.bandwidths, points=25)
    rtt = parse_duration(args.rtt)
    shapes = None
    try:
        from edgesplit.cli.options import shapes_from_args

        shapes = shapes_from_args(args) or None
    except (ImportError, AttributeError):
        pass
    choice = choose_cuts(args.model, edge, cloud, bws if len(bws) > 2 else (bws[0], bws[-1]), rtt_s=rtt,
                         max_cuts=args.max_cuts, codec=args.auto_codec, shapes=shapes)
    print(f"min-cut over {len(bws)} bandwidths {_fmt_bw(bws[0])}..{_fmt_bw(bws[-1])}, rtt {rtt * 1e3:g} ms, "
          f"codec {args.auto_codec}:", file=out)
    for bw, ms, kind, idx, best in choice.table:
        what = f"cut {idx + 1}" if idx is not None else kind
        print(f"  {_fmt_bw(bw):>10}  {ms:9.2f} ms  {what}" + (f"  (kept cuts: {best:.2f} ms)" if best > ms * 1.0001 else ""),
              file=out)
    if choice.dropped:
        print(f"  ({choice.dropped} winning cut(s) left out: they do not nest with the kept ones)", file=out)
    cuts = [list(c) for c in choice.cuts]
    if not cuts:
        # No split wins anywhere in the range: keep the best chain-order cut at the middle
        # bandwidth so that the bundle still has one.
        problem = SplitProblem(args.model, edge, cloud, codec=args.auto_codec, shapes=shapes)
        heads = problem.chain_heads()
        if not heads:
            raise CutError("the model has a single compute node: nothing to cut")
        mid = math.sqrt(bws[0] * bws[-1])
        best = min(heads, key=lambda h: problem.cost_ms(h, mid, rtt))
        cuts = [list(problem.cut_tensors(best))]
        print(f"  no split beats all-edge/all-cloud in this range; keeping the best chain cut at "
              f"{_fmt_bw(mid)}: {', '.join(cuts[0])}", file=out)
    return cuts


# -- edgesplit plan ------------------------------------------------------------------------------
def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="expected latency per cut and bandwidth; the best cut",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("--edge-profile", required=True, metavar="E.json", help="the device's profile of BUNDLE")
    p.add_argument("--cloud-profile", default=None, metavar="C.json",
                   help="the cloud's profile of BUNDLE (default: the device's / --cloud-speedup)")
    p.add_argument("--cloud-speedup", type=float, default=1.0,
                   help="without --cloud-profile: how much faster the cloud is (default 1)")
    p.add_argument("--bandwidth", default="1mbit:100mbit",
                   help="LO:HI (log-spaced --points), a list A,B,C, or one rate (default 1mbit:100mbit)")
    p.add_argument("--points", type=int, default=7, help="bandwidths in a LO:HI range (default 7)")
    p.add_argument("--rtt", default="20ms", help="round-trip time (default 20ms)")
    p.add_argument("--queue", default="0ms", help="expected cloud queueing delay (default 0ms)")
    p.add_argument("--codec", default="raw", help="codec the edge sends with (default raw)")
    p.add_argument("--batch", type=int, default=1, help="samples per request (default 1)")
    p.add_argument("--power", default=None, metavar="P.json",
                   help="device power profile {busy_w, idle_w, tx_j_per_byte, rx_j_per_byte}: adds energy")
    p.add_argument("--objective", choices=("latency", "energy"), default="latency")
    p.add_argument("--plot", default=None, metavar="PLAN.png", help="write a plot (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.set_defaults(func=run)


def build_table(model, bandwidths, rtt_s, queue_s=0.0, objective="latency"):
    """Rows of {bandwidth_bps, latency_ms: [per cut], energy_j: [...]|None, best}."""
    rows = []
    for bw in bandwidths:
        costs = model.costs(bw, rtt_s, queue_s)
        best = min(reversed(costs), key=lambda c: c.objective(objective))
        rows.append({
            "bandwidth_bps": bw,
            "latency_ms": [c.total_ms for c in costs],
            "energy_j": [c.energy_j for c in costs] if model.power else None,
            "best": best.cut,
        })
    return rows


def run(args) -> int:
    from pathlib import Path

    from edgesplit.bundle import Bundle
    from edgesplit.errors import ConfigError
    from edgesplit.netsim import parse_duration
    from edgesplit.planning import CostModel, DevicePower, Profile

    bundle = Bundle.load(args.bundle)
    edge = Profile.load(args.edge_profile)
    cloud = Profile.load(args.cloud_profile) if args.cloud_profile else None
    for what, prof in (("edge", edge), ("cloud", cloud)):
        if prof is not None and prof.bundle_id != bundle.id:
            print(f"edgesplit plan: warning: the {what} profile was made on bundle {prof.bundle_id[:12]}, "
                  f"not {bundle.id[:12]}", file=sys.stderr)
    power = None
    if args.power:
        try:
            power = DevicePower.from_json(json.loads(Path(args.power).read_text()))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read power profile {args.power}: {exc}") from None
    if args.objective == "energy" and power is None:
        raise ConfigError("--objective energy needs --power")
    model = CostModel.from_bundle(bundle, edge, cloud, codec=args.codec, batch=args.batch, power=power,
                                  cloud_speedup=args.cloud_speedup)
    bws = parse_bandwidths(args.bandwidth, args.points)
    rtt = parse_duration(args.rtt)
    queue = parse_duration(args.queue)
    rows = build_table(model, bws, rtt, queue, args.objective)
    n = bundle.num_segments
    if args.json:
        print(json.dumps({"bundle": bundle.id, "rtt_s": rtt, "queue_s": queue, "codec": args.codec,
                          "cut_bytes": model.bytes_up, "rows": rows}, indent=2))
    else:
        print(f"{bundle.name}: {n} segments; rtt {rtt * 1e3:g} ms, queue {queue * 1e3:g} ms, codec {args.codec}, "
              f"batch {args.batch}")
        print(f"edge: {edge.device} [{edge.runner}, threads {edge.threads or 'default'}"
              + (f", slowdown x{edge.slowdown:g}" if edge.slowdown != 1 else "") + "]")
        if cloud:
            print(f"cloud: {cloud.device} [{cloud.runner}]")
        names = ["cloud" if k == 0 else ("edge" if k == n else f"cut {k}") for k in range(n + 1)]
        kib = [f"{b / 1024:.0f}K" if k < n else "-" for k, b in enumerate(model.bytes_up)]
        print("expected latency (ms) per cut; * = best" + (f" by {args.objective}" if power else ""))
        print(f"{'bandwidth':>10} " + " ".join(f"{s:>9}" for s in names) + "   best")
        print(f"{'sent':>10} " + " ".join(f"{s:>9}" for s in kib))
        for r in rows:
            cells = []
            for k, ms in enumerate(r["latency_ms"]):
                cell = "inf" if math.isinf(ms) else f"{ms:.1f}"
                cells.append(f"{cell + ('*' if k == r['best'] else ' '):>9}")
            print(f"{_fmt_bw(r['bandwidth_bps']):>10} " + " ".join(cells) + f"   {names[r['best']]}")
    if args.plot:
        plot(rows, names if not args.json else None, n, bundle.name, rtt, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0


def plot(rows, names, n, title, rtt, path) -> None:
    from edgesplit.deps import require

    matplotlib = require("matplotlib", "--plot")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "--plot")
    names = names or ["cloud" if k == 0 else ("edge" if k == n else f"cut {k}") for k in range(n + 1)]
    bws = [r["bandwidth_bps"] / 1e6 for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k in range(n + 1):
        ys = [r["latency_ms"][k] for r in rows]
        style = "--" if k in (0, n) else "-"
        ax.plot(bws, ys, style, label=names[k], alpha=0.8)
    best = [r["latency_ms"][r["best"]] for r in rows]
    ax.plot(bws, best, "k:", linewidth=3, label="best", alpha=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bandwidth (Mbit/s)")
    ax.set_ylabel("expected latency (ms)")
    ax.set_title(f"{title}: rtt {rtt * 1e3:g} ms")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
