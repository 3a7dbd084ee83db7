"""Chaos: real cloud servers and real EdgeAgents while things break; is every request answered once, right?

Scenarios (each prints requests sent / answered / lost / duplicated / wrong, where the answers
came from, false "down" verdicts and peak RSS):

* worker-kills: a server with 3 tail worker processes; a random worker is SIGKILLed every
  ~2 s while two agents stream requests. The broker re-dispatches, so the target is zero local
  answers and zero "down" verdicts while the broker lives.
* broker-kill: the whole server is SIGKILLed, then started again on the same port, a few
  times. Each kill must be found (time shown) and answered locally, and the cloud used again.
* slow-link: a 1 Mbit/s link (edgesplit.netsim) carrying 38 kB requests; it is cut for 10 s and
  restored. One "down" for the cut is right; any other is false.
* hostile-clients: garbage, truncated, huge-size and wrong-dtype frames and a flood of
  connections beside a well-behaved agent, which must keep getting correct cloud answers.
* malicious-server: a fake server that is alive (pongs) but answers with garbage, wrong shapes,
  wrong ids and huge frames: every answer must come from the device, correct.

    python benchmarks/chaos.py [--scenario NAME ...] [--seconds 30] [--json out.json]
    python benchmarks/under_load.py -- python benchmarks/chaos.py     # the same beside CPU hogs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import zmq

from edge_agent import AgentConfig, EdgeAgent
from edge_agent.local_cloud import DEMO_MODEL, LocalCloud, demo_bundle
from edgesplit import protocol as P
from edgesplit.netsim import LinkEmulator

SCENARIOS = ("worker-kills", "broker-kill", "slow-link", "hostile-clients", "malicious-server")
# Generous: a loaded 2-core box computes EfficientNet slowly; what matters is "answered once, right".
AGENT = AgentConfig(deadline_ms=20_000, connect_timeout_ms=30_000, max_in_flight=4, intra_op_threads=1,
                    profile_runs=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    """Peak RSS (VmHWM) of `pid` and its children, MiB."""
    pids, total = {pid}, 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1]) == pid:
                    pids.add(int(d))
            except (OSError, IndexError, ValueError):
                pass
    for p in pids:
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmHWM:"):
                    total = max(total, int(line.split()[1]))  # the largest one process reached
        except OSError:
            pass
    return total / 1024


def self_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Reference:
    """Inputs and the full model's outputs for them (onnxruntime on the whole model)."""

    def __init__(self, bundle, n: int = 4):
        import onnxruntime as ort

        rng = np.random.default_rng(0)
        self.name = bundle.inputs[0].name
        self.inputs = [rng.standard_normal((1, 3, 224, 224)).astype(np.float32) for _ in range(n)]
        sess = ort.InferenceSession(str(DEMO_MODEL), providers=["CPUExecutionProvider"])
        self.outputs = [sess.run(None, {sess.get_inputs()[0].name: x})[0] for x in self.inputs]

    def right(self, i: int, res) -> bool:
        y = next(iter(res.outputs.values()))
        return y.shape == self.outputs[i].shape and np.allclose(y, self.outputs[i], rtol=1e-3, atol=1e-3)


class Stream:
    """Submits requests back to back (bounded by max_in_flight) and tallies every answer."""

    def __init__(self, agent: EdgeAgent, ref: Reference, pace_s: float = 0.0):
        self.agent, self.ref, self.pace_s = agent, ref, pace_s
        self.sent = 0
        self.calls: dict[int, int] = {}
        self.where: dict[str, int] = {}
        self.wrong = self.errors = 0
        self.futures = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            n = self.sent
            i = n % len(self.ref.inputs)
            f = self.agent.submit({self.ref.name: self.ref.inputs[i]})
            self.sent += 1
            f.add_done_callback(lambda fut, n=n, i=i: self._done(n, i, fut))
            self.futures.append(f)
            if self.pace_s:
                self._stop.wait(self.pace_s)

    def _done(self, n, i, fut):
        with self._lock:
            self.calls[n] = self.calls.get(n, 0) + 1
            if fut.exception() is not None:
                self.errors += 1
                return
            res = fut.result()
            self.where[res.where] = self.where.get(res.where, 0) + 1
            self.wrong += not self.ref.right(i, res)

    def start(self) -> "Stream":
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 120) -> dict:
        self._stop.set()
        self._thread.join()
        for f in self.futures:
            try:
                f.result(timeout=timeout_s)
            except Exception:  # noqa: BLE001 - counted in _done
                pass
        answered = len(self.calls)
        return {"sent": self.sent, "answered": answered, "lost": self.sent - answered,
                "duplicated": sum(c - 1 for c in self.calls.values() if c > 1), "wrong": self.wrong,
                "errors": self.errors, "where": dict(self.where)}


def admin(cloud: LocalCloud, path: str) -> dict:
    with urllib.request.urlopen(cloud.info["http"].rstrip("/") + path, timeout=10) as r:
        return json.loads(r.read())


def start_cloud(repo: Path, workers: int, bind: str = "tcp://127.0.0.1:0") -> LocalCloud:
    return LocalCloud(repo, workers=workers, bind=bind, http="127.0.0.1:0", threads=1, timeout_s=120).start()


def wait_until(cond, timeout_s: float = 60.0) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError("condition not reached")
        time.sleep(0.005)
    return time.monotonic() - t0


# -- scenarios ------------------------------------------------------------------------------------

def worker_kills(repo, bundle, ref, seconds, rng) -> dict:
    cloud = start_cloud(repo, workers=3)
    kills, lost_true = 0, set()
    try:
        with EdgeAgent(bundle, [cloud.address], cut=1, codec="raw", config=AGENT) as a1, \
                EdgeAgent(bundle, [cloud.address], cut=1, codec="raw", config=AGENT) as a2:
            streams = [Stream(a1, ref).start(), Stream(a2, ref).start()]
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                time.sleep(rng.uniform(1.5, 2.5))
                pids = [w["pid"] for w in admin(cloud, "/v1/models")["workers"] if w.get("pid")]
                # a victim only while another worker lives: the scenario is "the cloud
                # re-dispatches", not "the pool is empty" (a restarted worker needs seconds to load)
                if len(pids) >= 2:
                    victim = rng.choice(pids)
                    os.kill(victim, signal.SIGKILL)
                    lost_true.add(victim)
                    kills += 1
            out = merge([s.stop() for s in streams])
            out["false_down"] = sum(a.link_stats().counters.get("link_down", 0) for a in (a1, a2))
        lost = admin(cloud, "/v1/models").get("lost_workers", [])
        out.update(kills=kills, workers_lost=len(lost),
                   false_worker_losses=sum(w["pid"] not in lost_true for w in lost),
                   detect_ms_max=max((w["silent_ms"] for w in lost if w["pid"] in lost_true), default=None),
                   server_peak_rss_mb=round(peak_rss_mb(cloud.proc.pid), 1))
    finally:
        cloud.stop()
    out["target"] = "zero local answers, zero false downs, zero false worker losses"
    out["ok"] = out["where"].get("local", 0) == 0 and out["false_down"] == 0 and out["false_worker_losses"] == 0
    return out


def broker_kill(repo, bundle, ref, seconds, rng) -> dict:
    port = free_port()
    bind = f"tcp://127.0.0.1:{port}"
    cloud = start_cloud(repo, workers=1, bind=bind)
    detect, back, kills = [], [], 0
    try:
        with EdgeAgent(bundle, [cloud.address], cut=1, codec="raw", config=AGENT) as agent:
            def state():
                return agent.link_stats().servers[0].state

            stream = Stream(agent, ref, pace_s=0.01).start()
            for _ in range(max(1, int(seconds // 10))):
                wait_until(lambda: state() == "up")
                time.sleep(3)
                cloud.kill()
                kills += 1
                detect.append(round(1e3 * wait_until(lambda: state() != "up"), 1))
                cloud = start_cloud(repo, workers=1, bind=bind)
                n0 = stream.where.get("cloud", 0)
                back.append(round(1e3 * wait_until(lambda n0=n0: stream.where.get("cloud", 0) > n0 + 1), 1))
            out = stream.stop()
            out["false_down"] = agent.link_stats().counters.get("link_down", 0) - kills
            out["agent_peak_rss_mb"] = round(self_rss_mb(), 1)
    finally:
        cloud.stop()
    out.update(kills=kills, kill_detect_ms=detect, ready_to_cloud_ms=back,
               target="every kill found and answered locally; the cloud used again after each restart")
    out["ok"] = out["false_down"] == 0 and out["lost"] == 0 and out["wrong"] == 0 and len(back) == kills
    return out


def slow_link(repo, bundle, ref, seconds, rng, rate_bps=1e6, cut_s=10.0) -> dict:
    cloud = start_cloud(repo, workers=1)
    try:
        with LinkEmulator(to=cloud.address.split("//")[1], rate_bps=rate_bps, delay_s=0.02) as link, \
                EdgeAgent(bundle, [link.address], cut=2, codec="raw", config=AGENT) as agent:
            stats = agent.link_stats
            stream = Stream(agent, ref).start()
            time.sleep(seconds / 2)
            before_cut = stats().counters.get("link_down", 0)
            link.cut()
            detect_ms = 1e3 * wait_until(lambda: stats().servers[0].state != "up", cut_s)
            time.sleep(max(0.0, cut_s - detect_ms / 1e3))
            link.restore()
            back_ms = 1e3 * wait_until(lambda: stats().servers[0].state == "up", 60)
            at_restore = stats().counters.get("link_down", 0)
            n0 = stream.where.get("cloud", 0)
            time.sleep(seconds / 2)
            cloud_after = stream.where.get("cloud", 0) - n0
            out = stream.stop()
            downs = stats().counters.get("link_down", 0)
            out.update(rate_bps=rate_bps, cut_s=cut_s, cut_detect_ms=round(detect_ms, 1),
                       restore_to_up_ms=round(back_ms, 1), cloud_answers_after_restore=cloud_after,
                       false_down=before_cut + (downs - at_restore), agent_peak_rss_mb=round(self_rss_mb(), 1))
    finally:
        cloud.stop()
    out["target"] = "one down for the cut, none before it or after the restore"
    out["ok"] = out["false_down"] == 0 and out["lost"] == 0 and out["wrong"] == 0 and cloud_after > 0
    return out


def _hostile(address: str, stop: threading.Event, counts: dict, rng: random.Random) -> None:
    ctx = zmq.Context.instance()
    junk = [
        lambda: [os.urandom(rng.randint(0, 300))],
        lambda: [b"\x85\xa1v\x01\xa4kind"],  # truncated msgpack map
        lambda: [P.encode(P.ping("x"))[0][:-1]],
        lambda: [b"\x82\xa1v\x01\xa4kind\xa5infer", os.urandom(64)],  # infer without id/tensors
        lambda: _declared(2**40, "float32"),
        lambda: _declared(64, "complex256"),
        lambda: [b"\xc1" * 10] * 50,
    ]
    while not stop.is_set():
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.connect(address)
        for _ in range(20):
            try:
                s.send_multipart(rng.choice(junk)(), flags=zmq.NOBLOCK)
                counts["frames"] += 1
            except zmq.Again:
                pass
        s.close(0)
        counts["connections"] += 1
        stop.wait(0.01)


def _declared(nbytes: int, dtype: str) -> list:
    head = {"v": 1, "kind": "infer", "id": "evil", "bundle": "b" * 64, "cut": 1,
            "tensors": [{"name": "h", "dtype": dtype, "shape": [1, nbytes // 4], "codec": "raw", "params": {},
                         "nbytes": nbytes}]}
    import msgpack

    return [msgpack.packb(head), b"\0" * 16]


def hostile_clients(repo, bundle, ref, seconds, rng) -> dict:
    cloud = start_cloud(repo, workers=1)
    stop = threading.Event()
    counts = {"frames": 0, "connections": 0}
    try:
        with EdgeAgent(bundle, [cloud.address], cut=1, codec="raw", config=AGENT) as agent:
            stream = Stream(agent, ref).start()
            evil = [threading.Thread(target=_hostile, args=(cloud.address, stop, counts, random.Random(i)), daemon=True)
                    for i in range(3)]
            for t in evil:
                t.start()
            time.sleep(seconds)
            stop.set()
            for t in evil:
                t.join()
            out = stream.stop()
            out["false_down"] = agent.link_stats().counters.get("link_down", 0)
        out.update(hostile=counts, server_alive=cloud.proc.poll() is None,
                   server_peak_rss_mb=round(peak_rss_mb(cloud.proc.pid), 1))
    finally:
        cloud.stop()
    out["target"] = "the server survives; the good agent gets only correct cloud answers"
    out["ok"] = out["server_alive"] and out["where"].get("local", 0) == 0 and out["wrong"] == 0 and out["lost"] == 0
    return out


def _evil_server(sock: zmq.Socket, bundle_id: str, stop: threading.Event, counts: dict) -> None:
    rng = random.Random(3)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while not stop.is_set():
        if not poller.poll(50):
            continue
        frames = sock.recv_multipart()
        ident = frames[0]
        try:
            msg = P.decode(frames[1:])
        except Exception:  # noqa: BLE001 - whatever comes
            continue
        if msg.kind == "hello":
            P.send(sock, P.welcome(msg.id, bundle=bundle_id, held=True, load={"workers": 1}), [ident])
        elif msg.kind == "ping":
            P.send(sock, P.pong(msg.id, load={"workers": 1}), [ident])
        elif msg.kind == "infer":
            counts["replies"] += 1
            how = rng.randrange(5)
            if how == 0:
                sock.send_multipart([ident, os.urandom(100)])
            elif how == 1:  # right id, wrong shape
                y = np.zeros((1, 7), np.float32)
                P.send(sock, P.result(msg.id, {"y": _raw(y)}), [ident])
            elif how == 2:  # a reply to somebody else
                P.send(sock, P.result("not-yours", {"y": _raw(np.zeros((1, 1000), np.float32))}), [ident])
            elif how == 3:  # a huge declared shape over a small payload
                import msgpack

                head = {"v": 1, "kind": "result", "id": msg.id, "tensors": [
                    {"name": "y", "dtype": "float32", "shape": [1, 1 << 30], "codec": "raw", "params": {},
                     "nbytes": 4 << 30}]}
                sock.send_multipart([ident, msgpack.packb(head), b"\0" * 64])
            else:  # a 64 MB frame
                sock.send_multipart([ident, b"\x81" + b"\0" * (64 << 20)])


def _raw(y: np.ndarray):
    from edgesplit.codecs import get_codec

    return get_codec("raw").encode(y)


def malicious_server(repo, bundle, ref, seconds, rng) -> dict:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()
    counts = {"replies": 0}
    t = threading.Thread(target=_evil_server, args=(sock, bundle.id, stop, counts), daemon=True)
    t.start()
    try:
        with EdgeAgent(bundle, [f"tcp://127.0.0.1:{port}"], cut=1, codec="raw",
                       config=AGENT.replace(deadline_ms=5000, ban_initial_ms=50, ban_max_ms=200)) as agent:
            stream = Stream(agent, ref).start()
            time.sleep(seconds)
            out = stream.stop()
            c = agent.link_stats().counters
            out.update(bad_replies=c.get("bad_replies", 0), evil_replies=counts["replies"],
                       agent_peak_rss_mb=round(self_rss_mb(), 1))
    finally:
        stop.set()
        t.join()
        sock.close(0)
    out["target"] = "every answer from the device and correct; agent peak RSS < 800 MiB"
    out["ok"] = out["where"].get("cloud", 0) == 0 and out["wrong"] == 0 and out["lost"] == 0 \
        and out["agent_peak_rss_mb"] < 800
    return out


def merge(parts: list[dict]) -> dict:
    out = {k: sum(p[k] for p in parts) for k in ("sent", "answered", "lost", "duplicated", "wrong", "errors")}
    where: dict[str, int] = {}
    for p in parts:
        for k, v in p["where"].items():
            where[k] = where.get(k, 0) + v
    out["where"] = where
    return out


RUN = {"worker-kills": worker_kills, "broker-kill": broker_kill, "slow-link": slow_link,
       "hostile-clients": hostile_clients, "malicious-server": malicious_server}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", action="append", choices=SCENARIOS, help="one or more (default: all)")
    ap.add_argument("--seconds", type=float, default=30.0, help="length of each scenario's stream")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="edgesplit-chaos-"))
    bundle = demo_bundle(tmp / "repo" / "efficientnet_lite0")
    ref = Reference(bundle)
    results = {"uptime": os.popen("uptime").read().strip(), "command": " ".join(sys.argv)}
    ok = True
    for name in args.scenario or SCENARIOS:
        t0 = time.monotonic()
        res = RUN[name](tmp / "repo", bundle, ref, args.seconds, rng)
        res["wall_s"] = round(time.monotonic() - t0, 1)
        results[name] = res
        ok &= res["ok"]
        print(f"{name:17s} {'OK  ' if res['ok'] else 'FAIL'} sent {res['sent']} answered {res['answered']} "
              f"lost {res['lost']} duplicated {res['duplicated']} wrong {res['wrong']} where {res['where']} "
              f"false-down {res.get('false_down', '-')}", flush=True)
        print("    " + json.dumps({k: v for k, v in res.items() if k not in ("sent", "answered", "lost", "duplicated",
                                                                            "wrong", "where", "ok")}), flush=True)
    results["uptime_after"] = os.popen("uptime").read().strip()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
