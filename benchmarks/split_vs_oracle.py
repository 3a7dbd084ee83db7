"""Split inference against the oracle: measured end-to-end p50 latency through an emulated link.

For each model and link (rate, RTT) it measures, with a real cloud server (`python -m
cloud_server`) and real EdgeAgents talking through edgesplit.netsim:

* all-edge: the whole model on the device (the agent's local path);
* all-cloud: cut 0, the input shipped as is (with --codec, default raw);
* every cut of two bundles: a chain bundle (narrow candidate cuts along the topological
  order, Neurosurgeon's space) and the auto bundle (`partition --auto`: min-cut cuts, DADS);
  the oracle is the best measured p50 among all of these fixed choices;
* auto: EdgeAgent(cut="auto") on the auto bundle, choosing at run time.

Configurations run interleaved, one request each per round, so background load hits all of
them alike; after `--prune-after` rounds a configuration more than `--prune-factor` times
slower than the best one so far stops (its p50 comes from the rounds it ran).

The device is emulated: the edge runs single-threaded on this CPU, and `--edge-slowdown F`
makes each segment take F times the fastest time it ever ran here (the rest is slept), standing
in for a slower board with a steady speed. State F wherever these numbers are shown.

A trace case (`--trace-rates HI,LO`) starts at HI Mbit/s, drops to LO after `--trace-drop-s`
seconds, and records how long auto takes to move to the cut that is best at LO.

    python benchmarks/split_vs_oracle.py --model edge_agent/demo_data/efficientnet_lite0.onnx \\
        --rates 1,3,10,30,100 --rtt-ms 20 --json benchmarks/results/split_vs_oracle.json

Writes OUT.json (per model and link: model, rate_mbit, rtt_ms, auto_ms, oracle_ms, all_edge_ms,
all_cloud_ms, ...), and beside it OUT.md (the table) and OUT.png (the plot).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = ["edge_agent/demo_data/efficientnet_lite0.onnx", "models/resnet_branching.onnx", "models/vit_mini.onnx"]


# -- servers -------------------------------------------------------------------------------------
class Server:
    """The real cloud server (`python -m cloud_server`) over a repository of bundles."""

    def __init__(self, repository: Path, bundles: dict[str, Path]):
        from edge_agent.local_cloud import LocalCloud

        self.procs = [LocalCloud(repository, workers=1).start()]
        self.address_of: dict[str, str] = {bid: self.procs[0].address for bid in bundles}

    def close(self):
        for p in self.procs:
            p.stop()


# -- preparing a model ---------------------------------------------------------------------------
@dataclass
class Prepared:
    name: str
    path: Path
    chain: object            # Bundle: narrow candidate cuts
    auto: object             # Bundle: the min-cut cuts (may be the chain bundle)
    auto_is_chain: bool
    edge_nodes: object
    cloud_nodes: object
    notes: list[str] = field(default_factory=list)


def prepare(model_path: Path, work: Path, args, log) -> Prepared:
    from edgesplit.graph import candidate_cuts, partition
    from edgesplit.planning import profile_nodes
    from edgesplit.planning.mincut import choose_cuts

    name = model_path.stem
    out = work / name
    out.mkdir(parents=True, exist_ok=True)
    log(f"[{name}] profiling nodes (edge: 1 thread x{args.edge_slowdown:g}; cloud: default threads)")
    edge_nodes = profile_nodes(model_path, threads=1, warmup=2, repeats=5, progress=False).scaled(args.edge_slowdown)
    cloud_nodes = profile_nodes(model_path, threads=None, warmup=2, repeats=5, progress=False)
    cands = candidate_cuts(model_path)
    k = min(args.chain_cuts, len(cands))
    picks = [cands[round(i * (len(cands) - 1) / max(1, k - 1))] for i in range(k)] if k else []
    seen, chain_cuts = set(), []
    for c in picks:
        if c.index not in seen:
            seen.add(c.index)
            chain_cuts.append(list(c.tensors))
    chain = partition(model_path, chain_cuts, out / "chain")
    rates = [r * 1e6 for r in args.rates]
    rtts = [r / 1e3 for r in args.rtt_ms]
    choice = choose_cuts(model_path, edge_nodes, cloud_nodes, bandwidths=(min(rates), max(rates)),
                         rtt_s=statistics.median(rtts), codec=args.codec, max_cuts=args.max_auto_cuts)
    notes = []
    if choice.cuts:
        auto = partition(model_path, [list(c) for c in choice.cuts], out / "auto")
        auto_is_chain = False
    else:
        notes.append("the min-cut found no split better than all-edge/all-cloud over the rate range; "
                     "auto runs on the chain bundle")
        auto, auto_is_chain = chain, True
    log(f"[{name}] chain bundle: {chain.num_segments - 1} cuts; auto bundle: "
        f"{'= chain' if auto_is_chain else f'{auto.num_segments - 1} min-cut cuts'}")
    return Prepared(name, model_path, chain, auto, auto_is_chain, edge_nodes, cloud_nodes, notes)


# -- measuring -----------------------------------------------------------------------------------
def agent_config(args, local_only: bool = False):
    from edge_agent import AgentConfig

    # Long deadlines and a patient heartbeat: a 600 kB request on a 1 Mbit/s link takes 5 s,
    # and what is measured here is the link, not the fallback.
    return AgentConfig(
        deadline_ms=120_000.0, fallback="local" if local_only else "error", intra_op_threads=1,
        heartbeat_interval_ms=1000.0, heartbeat_misses=30, heartbeat_ttl_ms=60_000.0,
        connect_timeout_ms=0.0 if local_only else 10_000.0, profile_runs=3,
        cloud_speedup=args.edge_slowdown * args.cloud_speedup_hint, max_resends=0,
        edge_slowdown=args.edge_slowdown,  # the emulated device (see the module docstring)
    )


@dataclass
class Config:
    label: str               # "all-edge", "all-cloud", "chain:3", "auto-bundle:1", "auto"
    agent: object
    kind: str                # "fixed" | "auto"
    samples: list[float] = field(default_factory=list)
    cuts: list[int] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    active: bool = True

    @property
    def p50(self) -> float:
        return statistics.median(self.samples) if self.samples else math.inf


def make_configs(prep: Prepared, links: dict, args) -> list[Config]:
    """One agent per configuration; `links` maps a bundle id to the emulated link's address."""
    from edge_agent import EdgeAgent

    cfgs = []
    # All-edge through the agent's local path, on each bundle: fewer segments cost less overhead,
    # and auto's all-edge runs the auto bundle's segments, so the oracle gets both.
    local = agent_config(args, local_only=True)
    cfgs.append(Config("all-edge", EdgeAgent(prep.auto, [], runner="ort-cpu", codec=args.codec, cut=0,
                                             config=local), "fixed"))
    if not prep.auto_is_chain:
        cfgs.append(Config("all-edge:chain", EdgeAgent(prep.chain, [], runner="ort-cpu", codec=args.codec,
                                                       cut=0, config=local), "fixed"))
    cfg = agent_config(args)
    chain_link, auto_link = links[prep.chain.id], links[prep.auto.id]
    for k in range(prep.chain.num_segments):
        label = "all-cloud" if k == 0 else f"chain:{k}"
        cfgs.append(Config(label, EdgeAgent(prep.chain, [chain_link], runner="ort-cpu", codec=args.codec,
                                            cut=k, config=cfg), "fixed"))
    if not prep.auto_is_chain:
        for k in range(1, prep.auto.num_segments):
            cfgs.append(Config(f"mincut:{k}", EdgeAgent(prep.auto, [auto_link], runner="ort-cpu",
                                                        codec=args.codec, cut=k, config=cfg), "fixed"))
    cfgs.append(Config("auto", EdgeAgent(prep.auto, [auto_link], runner="ort-cpu", codec=args.codec,
                                         cut="auto", config=cfg), "auto"))
    return cfgs


def run_case(prep: Prepared, server: Server, rate_mbit: float, rtt_ms: float, args, log) -> dict:
    from contextlib import ExitStack

    from edgesplit.netsim import LinkEmulator
    from edgesplit.planning.profile import sample_inputs

    feeds = sample_inputs(prep.chain.inputs, batch=1, seed=1)
    with ExitStack() as stack:
        # One emulated link per server address (the real server holds both bundles: one link).
        by_addr = {}
        for addr in sorted(set(server.address_of.values())):
            by_addr[addr] = stack.enter_context(
                LinkEmulator(to=addr.removeprefix("tcp://"), rate_bps=rate_mbit * 1e6, delay_s=rtt_ms / 2e3))
        links = {bid: by_addr[addr].address for bid, addr in server.address_of.items()}
        cfgs = make_configs(prep, links, args)
        try:
            for c in cfgs:
                for _ in range(args.auto_warmup if c.kind == "auto" else args.warmup):
                    c.agent.infer(feeds)
            for rnd in range(args.requests):
                for c in cfgs:
                    if not c.active:
                        continue
                    t0 = time.perf_counter()
                    r = c.agent.infer(feeds)
                    c.samples.append((time.perf_counter() - t0) * 1e3)
                    c.cuts.append(r.cut)
                    c.where.append(r.where)
                if rnd + 1 == args.prune_after:
                    best = min(c.p50 for c in cfgs if c.kind == "fixed")
                    for c in cfgs:
                        if c.kind == "fixed" and c.p50 > args.prune_factor * best:
                            c.active = False
            auto_stats = next(c for c in cfgs if c.kind == "auto").agent.link_stats()
        finally:
            for c in cfgs:
                c.agent.close()
    fixed = [c for c in cfgs if c.kind == "fixed"]
    oracle = min(fixed, key=lambda c: c.p50)
    auto = next(c for c in cfgs if c.kind == "auto")
    by = {c.label: c for c in cfgs}
    # The baseline is the better of the two all-edge runs (they differ only in segment count).
    all_edge = min(c.p50 for c in fixed if c.label.startswith("all-edge"))
    bad_where = [c.label for c in fixed if not c.label.startswith("all-edge") and any(w != "cloud" for w in c.where)]
    rec = {
        "model": prep.name, "rate_mbit": rate_mbit, "rtt_ms": rtt_ms,
        "auto_ms": auto.p50, "oracle_ms": oracle.p50,
        "all_edge_ms": all_edge, "all_cloud_ms": by["all-cloud"].p50,
        "oracle_config": oracle.label,
        "auto_vs_oracle": auto.p50 / oracle.p50,
        "speedup_vs_all_edge": all_edge / auto.p50,
        "speedup_vs_all_cloud": by["all-cloud"].p50 / auto.p50,
        "auto_cuts": {str(k): auto.cuts.count(k) for k in sorted(set(auto.cuts))},
        "auto_local_answers": sum(w == "local" for w in auto.where),
        "auto_estimate": {"bandwidth_mbit": (auto_stats.bandwidth_bps or 0) / 1e6, "rtt_ms": auto_stats.rtt_ms},
        "configs": {c.label: {"p50_ms": c.p50, "n": len(c.samples)} for c in cfgs},
        "requests": args.requests, "edge_slowdown": args.edge_slowdown,
    }
    if bad_where:
        rec["warning"] = f"fixed cloud configs answered locally: {bad_where}"
    log(f"[{prep.name}] {rate_mbit:g} Mbit/s rtt {rtt_ms:g} ms: auto {auto.p50:.1f} ms, oracle {oracle.p50:.1f} "
        f"({oracle.label}), all-edge {all_edge:.1f}, all-cloud {by['all-cloud'].p50:.1f}  "
        f"auto/oracle {rec['auto_vs_oracle']:.3f}  auto cuts {rec['auto_cuts']}")
    return rec


def run_trace(prep: Prepared, server: Server, static: list[dict], args, log) -> dict:
    """Auto on a link whose rate drops mid-run: how soon does it move to the right cut?"""
    from edge_agent import EdgeAgent
    from edgesplit.netsim import LinkEmulator
    from edgesplit.planning.profile import sample_inputs

    hi, lo = args.trace_rates
    rtt = args.rtt_ms[0]
    addr = server.address_of[prep.auto.id].removeprefix("tcp://")
    feeds = sample_inputs(prep.auto.inputs, batch=1, seed=1)
    log(f"[{prep.name}] trace: {hi:g} -> {lo:g} Mbit/s at t={args.trace_drop_s:g} s, rtt {rtt:g} ms")
    events = []
    with LinkEmulator(to=addr, rate_bps=hi * 1e6, delay_s=rtt / 2e3) as link:
        agent = EdgeAgent(prep.auto, [link.address], runner="ort-cpu", codec=args.codec, cut="auto",
                          config=agent_config(args))
        try:
            for _ in range(args.auto_warmup):
                agent.infer(feeds)
            t_start = time.monotonic()
            dropped_at = None
            while time.monotonic() - t_start < args.trace_total_s:
                now = time.monotonic()
                if dropped_at is None and now - t_start >= args.trace_drop_s:
                    link.set(rate_bps=lo * 1e6)
                    dropped_at = now
                t0 = time.perf_counter()
                r = agent.infer(feeds)
                ms = (time.perf_counter() - t0) * 1e3
                st = agent.link_stats()
                events.append({"t_s": now - t_start, "ms": ms, "cut": r.cut, "where": r.where,
                               "est_mbit": (st.bandwidth_bps or 0) / 1e6, "est_rtt_ms": st.rtt_ms})
        finally:
            agent.close()
    n = prep.auto.num_segments
    # The cuts that are good at the low rate: measured p50 within 10 % of the oracle's there.
    low = [s for s in static if s["model"] == prep.name and s["rate_mbit"] == lo and s["rtt_ms"] == rtt]
    good = None
    if low:
        cfgs = low[0]["configs"]
        best = low[0]["oracle_ms"]
        good = set()
        for label, v in cfgs.items():
            if v["p50_ms"] <= 1.10 * best:
                if label.startswith("all-edge"):
                    good.add(n)
                elif label.startswith("mincut:") and not prep.auto_is_chain:
                    good.add(int(label.split(":")[1]))
                elif prep.auto_is_chain and (label.startswith("chain:") or label == "all-cloud"):
                    good.add(0 if label == "all-cloud" else int(label.split(":")[1]))
                elif label == "all-cloud" and not prep.auto_is_chain:
                    good.add(0)
    drop_t = args.trace_drop_s
    follow_s = None
    if good:
        after = [e for e in events if e["t_s"] >= drop_t]
        # Follow time: when the first request that uses a good cut starts, after the drop.
        for e in after:
            if e["cut"] in good or (n in good and e["where"] == "local" and e["cut"] == n):
                follow_s = e["t_s"] - drop_t
                break
    before = [e["ms"] for e in events if e["t_s"] < drop_t]
    after_settled = [e["ms"] for e in events if follow_s is not None and e["t_s"] >= drop_t + follow_s]
    rec = {"model": prep.name, "rtt_ms": rtt, "from_mbit": hi, "to_mbit": lo, "drop_at_s": drop_t,
           "good_cuts_after": sorted(good) if good else None, "follow_s": follow_s,
           "p50_before_ms": statistics.median(before) if before else None,
           "p50_after_settled_ms": statistics.median(after_settled) if after_settled else None,
           "events": events}
    log(f"[{prep.name}] trace: follows the drop in {follow_s if follow_s is None else round(follow_s, 3)} s "
        f"(good cuts at {lo:g} Mbit/s: {rec['good_cuts_after']})")
    return rec


# -- output --------------------------------------------------------------------------------------
def auto_choice_label(rec: dict) -> str | None:
    """The fixed configuration that auto's most used cut is (its label in rec["configs"])."""
    if not rec.get("auto_cuts"):
        return None
    k = int(max(rec["auto_cuts"].items(), key=lambda kv: kv[1])[0])
    labels = rec["configs"]
    mincut = sorted(int(x.split(":")[1]) for x in labels if x.startswith("mincut:"))
    chain = sorted(int(x.split(":")[1]) for x in labels if x.startswith("chain:"))
    n = (len(mincut) if mincut else len(chain)) + 1   # segments of the bundle auto ran on
    if k == 0:
        return "all-cloud"
    if k == n:
        return "all-edge"
    return f"mincut:{k}" if mincut else f"chain:{k}"


def summarize(results: list[dict]) -> dict:
    ratios = [r["auto_vs_oracle"] for r in results]
    same = 0
    for r in results:
        label = auto_choice_label(r)
        oracle = "all-edge" if r["oracle_config"].startswith("all-edge") else r["oracle_config"]
        r["auto_config"] = label
        r["auto_chose_oracle_config"] = label == oracle
        # Not the same configuration, but measured no slower than the oracle (within 10 %):
        r["auto_within_10pct"] = r["auto_vs_oracle"] <= 1.10
        same += label == oracle
    return {
        "cases": len(results),
        "within_10pct": sum(x <= 1.10 for x in ratios),
        "auto_chose_oracle_config": same,
        "worst_auto_vs_oracle": max(ratios) if ratios else None,
        "geomean_auto_vs_oracle": geomean(ratios),
        "geomean_speedup_vs_all_edge": geomean([r["speedup_vs_all_edge"] for r in results]),
        "geomean_speedup_vs_all_cloud": geomean([r["speedup_vs_all_cloud"] for r in results]),
    }


def geomean(xs):
    xs = [x for x in xs if x and x > 0 and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def write_outputs(out_json: Path, doc: dict) -> None:
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(doc, indent=2) + "\n")
    md = out_json.with_suffix(".md")
    res = doc["results"]
    lines = ["# Split vs oracle: measured p50 latency (ms)", "",
             f"Machine: {doc['machine']}.  ",
             f"Edge: this CPU, 1 thread, **slowed down x{doc['edge_slowdown']:g}** (each segment takes {doc['edge_slowdown']:g} x its fastest time here); cloud: `{doc['server']}` "
             f"server on the same machine, reached through `edgesplit.netsim` (rate per direction, "
             f"one-way delay = RTT/2). Codec `{doc['codec']}`. {doc['requests']} requests per configuration "
             f"(after {doc['warmup']} warm-up; auto after {doc.get('auto_warmup', doc['warmup'])}), interleaved.  ",
             f"Command: `{doc['command']}`", "",
             "| model | Mbit/s | RTT ms | auto (its config) | oracle (config) | all-edge | all-cloud | auto/oracle | "
             "x all-edge | x all-cloud | auto's cuts (count) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in res:
        lines.append(f"| {r['model']} | {r['rate_mbit']:g} | {r['rtt_ms']:g} | {r['auto_ms']:.1f} ({r.get('auto_config')}) | "
                     f"{r['oracle_ms']:.1f} ({r['oracle_config']}) | {r['all_edge_ms']:.1f} | "
                     f"{r['all_cloud_ms']:.1f} | {r['auto_vs_oracle']:.3f} | {r['speedup_vs_all_edge']:.2f} | "
                     f"{r['speedup_vs_all_cloud']:.2f} | {r['auto_cuts']} |")
    s = doc["summary"]
    lines += ["", f"Cases: {s['cases']}; auto's measured p50 within 10 % of the oracle's in {s['within_10pct']} "
              f"(worst auto/oracle {s['worst_auto_vs_oracle']:.3f}); auto ran the oracle's own configuration in "
              f"{s['auto_chose_oracle_config']}, where any gap is the noise of measuring one configuration "
              f"twice. Geometric mean speedup of auto: "
              f"x{s['geomean_speedup_vs_all_edge']:.2f} vs all-edge, x{s['geomean_speedup_vs_all_cloud']:.2f} "
              f"vs all-cloud; geometric mean auto/oracle {s['geomean_auto_vs_oracle']:.3f}.", ""]
    for note in doc.get("notes", []):
        lines.append(f"- {note}")
    if doc.get("trace"):
        t = doc["trace"]
        lines += ["", "## Trace: the link drops mid-run", "",
                  f"{t['model']}: {t['from_mbit']:g} -> {t['to_mbit']:g} Mbit/s at t = {t['drop_at_s']:g} s "
                  f"(RTT {t['rtt_ms']:g} ms). Auto moved to a cut within 10 % of the oracle at the low rate "
                  f"(cuts {t['good_cuts_after']}) "
                  + (f"**{t['follow_s']:.2f} s** after the drop" if t['follow_s'] is not None
                     else "**never**" if t['good_cuts_after'] else "(unknown: no static case at that rate)")
                  + f". p50 before the drop {t['p50_before_ms'] or float('nan'):.1f} ms, after settling "
                  f"{t['p50_after_settled_ms'] or float('nan'):.1f} ms."]
    md.write_text("\n".join(lines) + "\n")
    try:
        plot(out_json.with_suffix(".png"), doc)
    except ImportError as exc:
        print(f"no plot: {exc}", file=sys.stderr)


def plot(path: Path, doc: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = doc["results"]
    models = list(dict.fromkeys(r["model"] for r in res))
    rtts = sorted({r["rtt_ms"] for r in res})
    rtt0 = doc["rtt_ms"][0] if doc.get("rtt_ms") else rtts[0]
    ncols = len(models) + (1 if doc.get("trace") else 0)
    fig, axes = plt.subplots(1, ncols, figsize=(4.6 * ncols, 4), squeeze=False)
    for ax, m in zip(axes[0], models):
        rows = sorted((r for r in res if r["model"] == m and r["rtt_ms"] == rtt0), key=lambda r: r["rate_mbit"])
        xs = [r["rate_mbit"] for r in rows]
        for key, style, label in (("all_edge_ms", "s--", "all-edge"), ("all_cloud_ms", "^--", "all-cloud"),
                                  ("oracle_ms", "k-", "oracle"), ("auto_ms", "o:", "auto")):
            ax.plot(xs, [r[key] for r in rows], style, label=label, alpha=0.85)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("link rate (Mbit/s)")
        ax.set_ylabel("p50 latency (ms)")
        ax.set_title(f"{m} (RTT {rtt0:g} ms)", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if doc.get("trace"):
        t = doc["trace"]
        ax = axes[0][-1]
        ev = t["events"]
        ax.plot([e["t_s"] for e in ev], [e["ms"] for e in ev], "o-", ms=3, label="auto latency")
        ax.axvline(t["drop_at_s"], color="r", ls="--", label=f"{t['from_mbit']:g}->{t['to_mbit']:g} Mbit/s")
        ax.set_yscale("log")
        ax.set_xlabel("time (s)")
        ax.set_ylabel("latency (ms)")
        ax2 = ax.twinx()
        ax2.step([e["t_s"] for e in ev], [e["cut"] for e in ev], "g-", where="post", alpha=0.5, label="cut")
        ax2.set_ylabel("cut")
        ax.set_title(f"trace: {t['model']}", fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"edge x{doc['edge_slowdown']:g} slower, 1 thread; {doc['machine'][:60]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=None, help="ONNX model (repeatable; default: the three shipped)")
    p.add_argument("--rates", default="1,3,10,30,100", help="link rates in Mbit/s (default 1,3,10,30,100)")
    p.add_argument("--rtt-ms", default="20", help="round-trip times in ms, comma-separated (default 20)")
    p.add_argument("--edge-slowdown", type=float, default=25.0, help="device slowdown factor (default 25)")
    p.add_argument("--codec", default="raw", help="codec for every configuration (default raw)")
    p.add_argument("--requests", type=int, default=9, help="timed requests per configuration (default 9)")
    p.add_argument("--warmup", type=int, default=1, help="untimed requests per fixed configuration first (default 1)")
    p.add_argument("--auto-warmup", type=int, default=3,
                   help="untimed requests of auto first, while its estimates settle (default 3)")
    p.add_argument("--prune-after", type=int, default=3, help="rounds before slow configurations stop")
    p.add_argument("--prune-factor", type=float, default=2.0, help="'slow' = this many times the best p50")
    p.add_argument("--chain-cuts", type=int, default=5, help="narrow candidate cuts in the chain bundle")
    p.add_argument("--max-auto-cuts", type=int, default=4, help="at most this many min-cut cuts")
    p.add_argument("--cloud-speedup-hint", type=float, default=1.0,
                   help="the agents' prior for cloud/edge speed is edge-slowdown x this (default 1)")
    p.add_argument("--trace-rates", default="30,3", help="HI,LO Mbit/s of the trace ('' = no trace)")
    p.add_argument("--trace-drop-s", type=float, default=6.0)
    p.add_argument("--trace-total-s", type=float, default=14.0)
    p.add_argument("--work", default=None, help="directory for bundles (default: a temporary one)")
    p.add_argument("--json", default="benchmarks/results/split_vs_oracle.json", help="output JSON (.md and .png beside)")
    p.add_argument("--resummarize", metavar="OUT.json",
                   help="only rebuild the summary, .md and .png of an earlier run's JSON")
    args = p.parse_args(argv)
    if args.resummarize:
        path = Path(args.resummarize)
        doc = json.loads(path.read_text())
        doc["summary"] = summarize(doc["results"])
        write_outputs(path, doc)
        print(json.dumps(doc["summary"], indent=2))
        return 0
    args.rates = [float(x) for x in args.rates.split(",") if x.strip()]
    args.rtt_ms = [float(x) for x in args.rtt_ms.split(",") if x.strip()]
    args.trace_rates = [float(x) for x in args.trace_rates.split(",") if x.strip()] if args.trace_rates else []
    if args.trace_rates and len(args.trace_rates) != 2:
        p.error("--trace-rates takes HI,LO")
    models = [Path(m) for m in (args.model or [str(REPO / m) for m in DEFAULT_MODELS])]
    for m in models:
        if not m.is_file():
            p.error(f"no such model: {m}")

    from edgesplit.planning.profile import device_description

    machine = device_description()
    t_begin = time.monotonic()

    def log(msg):
        print(f"[{time.monotonic() - t_begin:7.1f}s] {msg}", file=sys.stderr, flush=True)

    log(f"machine: {machine}; edge slowdown x{args.edge_slowdown:g}, 1 thread")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="split-vs-oracle-"))
    results, notes, trace = [], [], None
    for m in models:
        prep = prepare(m, work, args, log)
        notes += [f"{prep.name}: {n}" for n in prep.notes]
        repo = work / prep.name
        bundles = {prep.chain.id: prep.chain.path}
        if not prep.auto_is_chain:
            bundles[prep.auto.id] = prep.auto.path
        server = Server(repo, bundles)
        try:
            for rtt in args.rtt_ms:
                for rate in args.rates:
                    results.append(run_case(prep, server, rate, rtt, args, log))
            if args.trace_rates and trace is None:
                trace = run_trace(prep, server, results, args, log)
        finally:
            server.close()
    summary = summarize(results)
    doc = {
        "machine": machine, "python": platform.python_version(), "edge_slowdown": args.edge_slowdown,
        "edge_threads": 1, "codec": args.codec, "requests": args.requests, "warmup": args.warmup, "auto_warmup": args.auto_warmup,
        "server": "python -m cloud_server",
        "rates_mbit": args.rates, "rtt_ms": args.rtt_ms,
        "command": "python benchmarks/split_vs_oracle.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "results": results, "summary": summary, "trace": trace, "notes": notes,
        "wall_s": time.monotonic() - t_begin,
    }
    write_outputs(Path(args.json), doc)
    log(f"wrote {args.json} (+ .md, .png): {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
