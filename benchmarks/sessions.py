"""Stateful sessions: bytes on the wire and time per token, the KV cache kept in the cloud vs shipped every step.

The decoder (models/gpt_decoder.onnx, cut h.2.input) generates greedy tokens through edge + cloud
(a `python -m cloud_server` child, one worker) in two ways, alternating round by round:

* kept: a session (agent.session()): each side keeps its own layers' cache; per token only the
  cut activation goes up and the logits come down;
* shipped: the same model partitioned without state pairs (auto_state=False), run with
  agent.infer: the caches are ordinary model inputs and outputs, so every token ships them as
  tensors — the tail's cache up, the whole cache (present.*) down, and the head's new cache up
  and back (it is a model output, so it crosses the cut). This is what a stateless split does.

Both are measured on the wire: each agent reaches the server through its own
edgesplit.netsim.LinkEmulator (unlimited unless --rate-mbit/--delay-ms), whose byte counters (TCP payload: ZMTP framing, headers, tensors,
and the link's pings) are read before and after each run. A third row is computed, not
measured: shipping only the tail's cache (kept bytes + its past up and its present down, from
the cache's size at each step). The tokens of every run are checked against the unsplit model.
Last, the price of a rebuild: a session whose worker drops it (idle past session_idle_s, set to
1 s for the server here, as a lost worker's replacement holds nothing) after tokens-1 steps;
its next step replays them all.

    python benchmarks/sessions.py [--tokens 64] [--rounds 3] [--rate-mbit R] [--delay-ms D]
        [--json benchmarks/results/sessions.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import machine

from edge_agent import AgentConfig, EdgeAgent
from edge_agent.local_cloud import LocalCloud
from edgesplit.graph import partition
from edgesplit.netsim import LinkEmulator
from edgesplit.runtime import SegmentRunner

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "gpt_decoder.onnx"
PROMPT = [[72, 101, 108, 108, 111, 44, 32, 101, 100, 103, 101]]  # b"Hello, edge"


def next_ids(logits: np.ndarray) -> np.ndarray:
    return logits[:, -1:].argmax(-1).astype(np.int64)


def unsplit(bundle, tokens: int) -> list[int]:
    seg = SegmentRunner(bundle, "ort-cpu")
    n = bundle.num_segments
    state = {st.input: st.initial({"batch": 1}) for st in bundle.state_of(0, n)}
    ids, out = np.array(PROMPT, np.int64), []
    for _ in range(tokens):
        outs, state = seg.step({"input_ids": ids}, 0, n, state)
        ids = next_ids(outs["logits"])
        out.append(int(ids[0, 0]))
    return out


def run_kept(agent, tokens: int):
    ids, out, times = np.array(PROMPT, np.int64), [], []
    with agent.session() as s:
        for _ in range(tokens):
            t = time.perf_counter()
            r = s.step({"input_ids": ids})
            times.append(time.perf_counter() - t)
            assert r.where == "cloud", r
            ids = next_ids(r["logits"])
            out.append(int(ids[0, 0]))
    return out, times


def run_shipped(agent, tokens: int, past_names: list[str]):
    ids, out, times = np.array(PROMPT, np.int64), [], []
    past = {name: np.zeros((1, 4, 0, 16), np.float32) for name in past_names}
    for _ in range(tokens):
        t = time.perf_counter()
        r = agent.infer({"input_ids": ids, **past})
        times.append(time.perf_counter() - t)
        assert r.where == "cloud", r
        past = {name: r.outputs[name.replace("past_key_values", "present")] for name in past_names}
        ids = next_ids(r["logits"])
        out.append(int(ids[0, 0]))
    return out, times


def run_rebuild(agent, before: int, idle_s: float) -> dict:
    """`before` steps, a pause past the server's session_idle_s (the worker drops the session, as a
    lost worker's replacement holds nothing), then one step: rebuilt by replaying `before` steps."""
    ids = np.array(PROMPT, np.int64)
    times = []
    with agent.session() as s:
        for _ in range(before):
            t = time.perf_counter()
            r = s.step({"input_ids": ids})
            times.append(time.perf_counter() - t)
            ids = next_ids(r["logits"])
        time.sleep(idle_s + 1.0)
        t = time.perf_counter()
        r = s.step({"input_ids": ids})
        took = time.perf_counter() - t
    assert r.where == "cloud" and r.replayed == before, (r.where, r.replayed)
    return {"replayed_steps": before, "rebuild_step_ms": round(took * 1e3, 2),
            "ordinary_step_ms_p50": round(statistics.median(times[1:]) * 1e3, 3)}


def tail_cache_bytes(tokens: int) -> float:
    """Per token: the tail's 2 layers of K and V, [1, 4, L, 16] float32, up at length L and down at L + 1."""
    per_position = 2 * 2 * 4 * 16 * 4
    total, length = 0, 0
    for t in range(tokens):
        seq = len(PROMPT[0]) if t == 0 else 1
        total += per_position * length + per_position * (length + seq)
        length += seq
    return total / tokens


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate-mbit", type=float, default=None, help="the link's rate each way (default: unlimited)")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay added by the link")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rate = args.rate_mbit * 1e6 if args.rate_mbit else None
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        kept_b = partition(MODEL, [["h.2.input"]], repo / "kept", shapes={"input_ids": [1, 1]})
        past = [f"past_key_values.{i}.{kv}" for i in range(4) for kv in ("key", "value")]
        shapes = {"input_ids": [1, 1], **{p: [1, 4, 1, 16] for p in past}}
        ship_b = partition(MODEL, [["h.2.input"]], repo / "shipped", shapes=shapes, auto_state=False)
        want = unsplit(kept_b, args.tokens)
        cfg = AgentConfig(connect_timeout_ms=30_000, deadline_ms=30_000)
        # the server drops sessions idle this long: the rebuild row waits it out (a run never does)
        idle_s = 1.0
        os.environ["EDGESPLIT_SERVER_SESSION_IDLE_S"] = str(idle_s)
        with LocalCloud(repo, threads=1) as cloud, \
                LinkEmulator(to=cloud.address.split("//")[1], rate_bps=rate, delay_s=args.delay_ms / 1e3) as k_link, \
                LinkEmulator(to=cloud.address.split("//")[1], rate_bps=rate, delay_s=args.delay_ms / 1e3) as s_link, \
                EdgeAgent(kept_b, [k_link.address], cut=1, codec="raw", config=cfg) as kept, \
                EdgeAgent(ship_b, [s_link.address], cut=1, codec="raw", config=cfg) as shipped:
            # one link each: each agent's bytes (its pings included) are counted on its own link
            runs = {"kept": lambda: run_kept(kept, args.tokens),
                    "shipped": lambda: run_shipped(shipped, args.tokens, past)}
            links = {"kept": k_link, "shipped": s_link}
            for name in runs:  # warm-up: the first run of each loads and profiles
                runs[name]()
            got: dict[str, dict] = {name: {"bytes": [], "times": []} for name in runs}
            for _ in range(args.rounds):
                for name, run in runs.items():
                    link = links[name]
                    up0, down0 = link.stats.bytes_up, link.stats.bytes_down
                    tokens, times = run()
                    assert tokens == want, f"{name}: the tokens differ from the unsplit model's"
                    got[name]["bytes"].append((link.stats.bytes_up - up0, link.stats.bytes_down - down0))
                    got[name]["times"].extend(times)
            rebuild = run_rebuild(kept, args.tokens - 1, idle_s)
    for name, g in got.items():
        up = statistics.mean(b[0] for b in g["bytes"]) / args.tokens
        down = statistics.mean(b[1] for b in g["bytes"]) / args.tokens
        ms = [t * 1e3 for t in g["times"]]
        rows[name] = {"up_bytes_per_token": round(up), "down_bytes_per_token": round(down),
                      "bytes_per_token": round(up + down), "ms_per_token_p50": round(statistics.median(ms), 3),
                      "ms_per_token_mean": round(statistics.mean(ms), 3), "measured": True}
    computed = rows["kept"]["bytes_per_token"] + tail_cache_bytes(args.tokens)
    rows["tail cache shipped (computed)"] = {"bytes_per_token": round(computed), "measured": False}
    link_desc = (f"{args.rate_mbit:g} Mbit/s" if rate else "unlimited") + f", {args.delay_ms:g} ms one way"
    print(f"sessions: {args.tokens} greedy tokens of models/gpt_decoder.onnx cut at h.2.input, codec raw, "
          f"{args.rounds} rounds, link {link_desc}; every run's tokens equal the unsplit model's")
    print(f"machine: {machine()}")
    print(f"{'mode':32} {'up B/token':>11} {'down B/token':>13} {'B/token':>9} {'ms/token p50':>13} {'mean':>8}")
    for name, r in rows.items():
        if r["measured"]:
            print(f"{name:32} {r['up_bytes_per_token']:>11} {r['down_bytes_per_token']:>13} {r['bytes_per_token']:>9} "
                  f"{r['ms_per_token_p50']:>13.2f} {r['ms_per_token_mean']:>8.2f}")
        else:
            print(f"{name:32} {'':>11} {'':>13} {r['bytes_per_token']:>9}")
    ratio = rows["shipped"]["bytes_per_token"] / rows["kept"]["bytes_per_token"]
    print(f"shipping the cache costs {ratio:.1f}x the bytes of keeping it in the cloud")
    print(f"rebuild: a step whose worker holds nothing replays {rebuild['replayed_steps']} steps in "
          f"{rebuild['rebuild_step_ms']:.1f} ms (an ordinary step: {rebuild['ordinary_step_ms_p50']:.2f} ms p50)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine(), "tokens": args.tokens, "link": link_desc,
                                         "rows": rows, "rebuild": rebuild}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
