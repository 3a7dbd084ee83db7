"""`edgesplit netsim`: run the link emulator between a client and a server until interrupted."""

from __future__ import annotations

import argparse
import sys
import threading

HELP = """\
Forward TCP from --listen to --to through an emulated link (rate, delay, jitter, cuts).

While it runs, type commands on stdin (one per line):
  cut            blackhole the link (traffic stalls, new connections hang)
  reset          cut and reset every connection (new ones are refused)
  restore        bring the link back
  set rate=5mbit delay=40ms jitter=2ms     change the link (any subset)
  stats          print counters
  quit           stop

Trace CSV (--trace): header time_s,rate,delay[,jitter]; rate 'cut' takes the link down.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "netsim", help="user-space TCP link emulator (rate, delay, jitter, cut)",
        description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="address to accept on (port 0 picks one; printed on stdout)")
    p.add_argument("--to", required=True, metavar="HOST:PORT", help="the real server")
    p.add_argument("--rate", default=None, help="per-direction rate, e.g. 10mbit (default: unlimited)")
    p.add_argument("--up-rate", default=None, help="client->server rate (overrides --rate)")
    p.add_argument("--down-rate", default=None, help="server->client rate (overrides --rate)")
    p.add_argument("--delay", default="0ms", help="one-way delay per direction, e.g. 20ms")
    p.add_argument("--jitter", default="0ms", help="uniform +- jitter on the delay, e.g. 5ms")
    p.add_argument("--trace", default=None, metavar="FILE.csv", help="replay rate/delay/cuts over time")
    p.add_argument("--loop", action="store_true", help="repeat the trace forever")
    p.add_argument("--seed", type=int, default=None, help="seed for the jitter")
    p.set_defaults(func=run)


def _apply_command(link, line: str, out) -> bool:
    """Run one stdin command; False means quit."""
    from edgesplit.errors import ConfigError

    words = line.split()
    if not words:
        return True
    cmd, rest = words[0].lower(), words[1:]
    if cmd in ("quit", "exit", "q"):
        return False
    if cmd == "cut":
        link.cut()
    elif cmd == "reset":
        link.cut(reset=True)
    elif cmd in ("restore", "up"):
        link.restore()
    elif cmd == "stats":
        pass
    elif cmd == "set":
        kw = {}
        for item in rest:
            key, _, value = item.partition("=")
            key = {"rate": "rate_bps", "delay": "delay_s", "jitter": "jitter_s",
                   "up_rate": "up_rate_bps", "down_rate": "down_rate_bps"}.get(key.lower())
            if key is None:
                print(f"netsim: unknown setting in {item!r}", file=out, flush=True)
                return True
            kw[key] = value
        try:
            link.set(**kw)
        except ConfigError as exc:
            print(f"netsim: {exc}", file=out, flush=True)
            return True
    else:
        print(f"netsim: unknown command {cmd!r} (cut, reset, restore, set, stats, quit)",
              file=out, flush=True)
        return True
    print(f"netsim: {_describe(link)}", file=out, flush=True)
    return True


def _describe(link) -> str:
    from edgesplit.netsim import format_rate

    s, st = link.settings, link.stats
    return (f"{'up' if s['up'] else 'CUT'} up_rate={format_rate(s['up_rate_bps'])} "
            f"down_rate={format_rate(s['down_rate_bps'])} delay={s['delay_s'] * 1e3:g}ms "
            f"jitter={s['jitter_s'] * 1e3:g}ms conns={st.active}/{st.connections} "
            f"bytes_up={st.bytes_up} bytes_down={st.bytes_down}")


def run(args) -> int:
    from edgesplit.netsim import LinkEmulator, TracePlayer, load_trace

    kw = {}
    if args.up_rate is not None:
        kw["up_rate_bps"] = args.up_rate
    if args.down_rate is not None:
        kw["down_rate_bps"] = args.down_rate
    link = LinkEmulator(listen=args.listen, to=args.to, rate_bps=args.rate, delay_s=args.delay,
                        jitter_s=args.jitter, seed=args.seed, **kw)
    trace = load_trace(args.trace) if args.trace else None
    link.start()
    player = TracePlayer(link, trace, loop=args.loop).start() if trace else None
    print(f"netsim: {link.address} -> {args.to}  {_describe(link)}", flush=True)

    stop = threading.Event()

    def read_stdin():
        # EOF on stdin is not a request to stop (e.g. `edgesplit netsim ... </dev/null &`);
        # only an explicit `quit` is.
        try:
            for line in sys.stdin:
                if not _apply_command(link, line, sys.stdout):
                    stop.set()
                    return
        except (OSError, ValueError):
            return

    if sys.stdin is not None and not sys.stdin.closed:
        threading.Thread(target=read_stdin, name="netsim-stdin", daemon=True).start()
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        if player is not None:
            player.stop()
        link.close()
    return 0
