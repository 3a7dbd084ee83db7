"""Stateful sessions through edge + cloud: each side keeps its own segments' state, faults rebuild it exactly.

The real servers: cloud_server.Server in this process (thread workers, or process workers
where one is SIGKILLed), the agent's link through edgesplit.netsim.LinkEmulator where it is cut.
The codec is "raw" throughout: it is lossless (the cut tensors reach the tail bit for bit), so
a split run must give what the unsplit model gives, token for token.
"""

from __future__ import annotations

import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import zmq

from edge_agent import AgentConfig, EdgeAgent, StepResult
from edgesplit import codecs, protocol
from edgesplit.graph import partition
from edgesplit.netsim import LinkEmulator
from test_agent_support import RealCloud
from test_cloud_support import eventually
from test_models_stateful import GREEDY_64, PROMPT

MODELS = Path(__file__).resolve().parents[1] / "models"
GRU_STATE = [("hn.0", "h0.0"), ("hn.1", "h0.1")]
# Fast heartbeats: a cut link is seen within a fraction of a second; a step may take long (replays).
AGENT = dict(heartbeat_interval_ms=100, probe_timeout_ms=300, reconnect_initial_ms=50, reconnect_max_ms=500,
             deadline_ms=20_000, connect_timeout_ms=30_000, profile_runs=1)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("sessions") / "repo"
    gpt = partition(MODELS / "gpt_decoder.onnx", [["h.2.input"]], root / "gpt", shapes={"input_ids": [1, 1]})
    gru = partition(MODELS / "gru_stack.onnx", [["gru.0.y"]], root / "gru", state=GRU_STATE)
    return root, gpt, gru


@pytest.fixture(scope="module")
def gru_full():
    return ort.InferenceSession(str(MODELS / "gru_stack.onnx"), providers=["CPUExecutionProvider"])


def agent_for(bundle, address: str, **config) -> EdgeAgent:
    return EdgeAgent(bundle, [address], cut=1, codec="raw", config=AgentConfig(**{**AGENT, **config}))


def generate(session, tokens: int = 64, before_step=None) -> tuple[list[int], list[StepResult]]:
    """Greedy decoding through a session; before_step(t) runs before step t (a fault)."""
    ids, out, results = np.array(PROMPT, np.int64), [], []
    for t in range(tokens):
        if before_step is not None:
            before_step(t)
        r = session.step({"input_ids": ids})
        ids = r["logits"][:, -1:].argmax(-1).astype(np.int64)
        out.append(int(ids[0, 0]))
        results.append(r)
    return out, results


def gru_inputs(seed: int, steps: int, batch: int = 2) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((int(rng.integers(1, 4)), batch, 16)).astype(np.float32) for _ in range(steps)]


def gru_reference(full, xs: list[np.ndarray]) -> list[np.ndarray]:
    """The unsplit model stepped with its own state fed back."""
    batch = xs[0].shape[1]
    h = {"h0.0": np.zeros((1, batch, 32), np.float32), "h0.1": np.zeros((1, batch, 32), np.float32)}
    ys = []
    for x in xs:
        y, h0, h1 = full.run(["y", "hn.0", "hn.1"], {"x": x, **h})
        h = {"h0.0": h0, "h0.1": h1}
        ys.append(y)
    return ys


def metric(cloud_or_broker, name: str, labels: dict | None = None) -> float:
    broker = getattr(cloud_or_broker, "broker", cloud_or_broker)
    return broker.metrics.registry.get_sample_value(name, labels or {}) or 0.0


wait_for = partial(eventually, timeout=30.0)


# -- the decoder -------------------------------------------------------------------------------
def test_the_split_decoder_generates_the_unsplit_tokens_through_the_cloud(repo):
    root, gpt, _ = repo
    with RealCloud(root) as cloud, agent_for(gpt, cloud.address) as agent:
        with agent.session() as s:
            tokens, results = generate(s)
            assert wait_for(lambda: metric(cloud, "edgesplit_sessions") == 1)  # the worker holds it
        assert tokens == list(GREEDY_64)
        assert [r.where for r in results] == ["cloud"] * 64 and [r.step for r in results] == list(range(64))
        assert all(r.replayed == 0 for r in results)
        assert s.bytes_kept == 0  # closed: the history is gone
        assert wait_for(lambda: metric(cloud, "edgesplit_sessions") == 0)  # session_end dropped it there


def test_async_steps_and_interleaved_decoder_sessions(repo):
    import asyncio

    root, gpt, _ = repo

    async def one(s):
        ids, out = np.array(PROMPT, np.int64), []
        for _ in range(24):
            r = await s.step_async({"input_ids": ids})
            ids = r["logits"][:, -1:].argmax(-1).astype(np.int64)
            out.append(int(ids[0, 0]))
        return out

    async def main(agent):
        with agent.session() as a, agent.session() as b:
            return await asyncio.gather(one(a), one(b))

    with RealCloud(root, workers=2) as cloud, agent_for(gpt, cloud.address) as agent:
        got = asyncio.run(main(agent))
    assert got == [list(GREEDY_64[:24])] * 2  # neither sees the other's cache


def test_a_session_stays_with_one_of_several_servers(repo):
    root, gpt, _ = repo
    with RealCloud(root) as one, RealCloud(root) as two, \
            EdgeAgent(gpt, [one.address, two.address], cut=1, codec="raw", config=AgentConfig(**AGENT)) as agent:
        assert wait_for(lambda: all(s.state == "up" for s in agent.link_stats().servers))

        def one(_):
            with agent.session() as s:
                return generate(s, 24)

        with ThreadPoolExecutor(3) as pool:  # concurrent sessions spread over both servers by load
            runs = list(pool.map(one, range(3)))
    for tokens, results in runs:
        assert tokens == list(GREEDY_64[:24])
        assert len({r.server for r in results}) == 1 and all(r.replayed == 0 for r in results)


def _process_server(root: Path, workers: int = 2):
    from cloud_server import Server, ServerConfig

    cfg = ServerConfig(heartbeat_interval_s=0.1, intra_op_threads=1, drain_timeout_s=5.0, restart_delay_s=0)
    srv = Server(root, bind="tcp://127.0.0.1:0", http=None, devices=["cpu"] * workers, config=cfg,
                 worker_mode="process").start()
    if not srv.wait_ready(180):
        srv.stop()
        raise RuntimeError("the process workers did not become ready")
    return srv


def _holder_pid(srv, sid: str) -> int | None:
    """The pid of the worker the broker routes session `sid` to (read only: the broker's thread owns it)."""
    got = srv.broker.dispatcher.sessions._where.get(sid)
    w = srv.broker.registry.get(got[0]) if got else None
    return w.pid if w is not None else None


def _kill_holder(srv, sid: str) -> int:
    """SIGKILL the worker process that holds session `sid`; its pid."""
    pid = _holder_pid(srv, sid)
    os.kill(pid, signal.SIGKILL)
    return pid


@pytest.mark.slow
def test_decoder_survives_a_sigkill_of_its_worker_at_token_30(repo):
    root, gpt, _ = repo
    srv = _process_server(root)
    try:
        with agent_for(gpt, srv.broker.front_address) as agent, agent.session() as s:
            killed = []
            tokens, results = generate(s, before_step=lambda t: t == 30 and killed.append(_kill_holder(srv, s.id)))
            other = _holder_pid(srv, s.id)
    finally:
        srv.stop()
    assert killed and other is not None and other != killed[0]
    assert tokens == list(GREEDY_64)
    assert [r.where for r in results] == ["cloud"] * 64  # rebuilt in the cloud, not on the device
    assert results[30].replayed == 30 and all(r.replayed == 0 for r in results[:30] + results[31:])


def test_decoder_finishes_on_the_device_after_a_link_cut_at_token_40(repo):
    root, gpt, _ = repo
    with RealCloud(root) as cloud, LinkEmulator(to=cloud.address.split("//")[1]) as link:
        with agent_for(gpt, link.address) as agent, agent.session() as s:
            tokens, results = generate(s, before_step=lambda t: t == 40 and link.cut())
            counters = agent.link_stats().counters
    assert tokens == list(GREEDY_64)
    assert [r.where for r in results] == ["cloud"] * 40 + ["local"] * 24
    assert results[40].reason in ("link down", "deadline") and s.where == "local"
    assert counters["session_local"] == 24 and counters["session_cloud"] == 40


# -- the GRU stack: state on both sides of the cut ---------------------------------------------
def _run_gru_sessions(agent, xs_per_session, before_round=None) -> list[list[StepResult]]:
    """Interleave the sessions round-robin, one step each per round."""
    sessions = [agent.session() for _ in xs_per_session]
    results = [[] for _ in sessions]
    for t in range(len(xs_per_session[0])):
        if before_round is not None:
            before_round(t, sessions)
        for i, s in enumerate(sessions):
            results[i].append(s.step({"x": xs_per_session[i][t]}))
    for s in sessions:
        s.close()
    return results


def _check_gru(full, xs_per_session, results):
    for xs, rs in zip(xs_per_session, results):
        for want, r in zip(gru_reference(full, xs), rs):
            np.testing.assert_allclose(r["y"], want, rtol=0, atol=1e-5)


def test_many_interleaved_gru_sessions_each_equal_the_unsplit_run(repo, gru_full):
    root, _, gru = repo
    xs = [gru_inputs(seed, 10) for seed in range(12)]
    with RealCloud(root, workers=2) as cloud, agent_for(gru, cloud.address, max_in_flight=16) as agent:
        # three threads, four sessions each, interleaved within a thread and across threads
        with ThreadPoolExecutor(3) as pool:
            parts = list(pool.map(lambda g: _run_gru_sessions(agent, xs[4 * g:4 * g + 4]), range(3)))
    results = [r for part in parts for r in part]
    _check_gru(gru_full, xs, results)
    assert all(r.where == "cloud" for rs in results for r in rs)


@pytest.mark.slow
def test_gru_sessions_survive_a_sigkill_of_a_worker(repo, gru_full):
    root, _, gru = repo
    xs = [gru_inputs(100 + seed, 12) for seed in range(4)]
    srv = _process_server(root)
    try:
        with agent_for(gru, srv.broker.front_address) as agent:
            results = _run_gru_sessions(agent, xs, lambda t, ss: t == 5 and _kill_holder(srv, ss[0].id))
    finally:
        srv.stop()
    _check_gru(gru_full, xs, results)
    assert all(r.where == "cloud" for rs in results for r in rs)
    assert results[0][5].replayed == 5


def test_gru_sessions_finish_on_the_device_after_a_link_cut(repo, gru_full):
    root, _, gru = repo
    xs = [gru_inputs(200 + seed, 12) for seed in range(4)]
    with RealCloud(root) as cloud, LinkEmulator(to=cloud.address.split("//")[1]) as link:
        with agent_for(gru, link.address) as agent:
            results = _run_gru_sessions(agent, xs, lambda t, ss: t == 7 and link.cut())
    _check_gru(gru_full, xs, results)
    for rs in results:
        assert [r.where for r in rs] == ["cloud"] * 7 + ["local"] * 5


# -- expiry and the memory budget: reported, and rebuilt by the SDK ----------------------------
def test_an_expired_session_is_rebuilt_transparently(repo, gru_full, caplog):
    root, _, gru = repo
    xs = gru_inputs(7, 4)
    caplog.set_level(logging.WARNING, logger="cloud_server.sessions")
    with RealCloud(root, session_idle_s=1.0) as cloud, agent_for(gru, cloud.address) as agent:
        with agent.session() as s:
            rs = [s.step({"x": xs[0]}), s.step({"x": xs[1]})]
            assert wait_for(lambda: metric(cloud, "edgesplit_sessions_evicted_total", {"reason": "idle"}) >= 1)
            rs += [s.step({"x": xs[2]}), s.step({"x": xs[3]})]
    _check_gru(gru_full, [xs], [rs])
    assert [r.where for r in rs] == ["cloud"] * 4 and [r.replayed for r in rs] == [0, 0, 2, 0]
    assert any("evicted" in m and "idle" in m for m in caplog.messages)


def test_a_history_past_its_bound_is_dropped_and_a_later_loss_is_a_clear_error(repo, gru_full, caplog):
    """session_history_bytes bounds what a session keeps for rebuilds: past it the session goes on in
    the cloud, exact, but a cloud that lost its state can no longer be caught up: SessionLostError."""
    from edgesplit.errors import SessionLostError

    root, _, gru = repo
    xs = gru_inputs(8, 5, batch=1)
    caplog.set_level(logging.WARNING, logger="edge_agent._session")
    with RealCloud(root, session_idle_s=1.0) as cloud, \
            agent_for(gru, cloud.address, session_history_bytes=1500) as agent:
        with agent.session() as s:
            rs = [s.step({"x": x}) for x in xs[:3]]  # a step holds ~0.5-1.5 kB: the bound is passed
            assert not s.recoverable and s.bytes_kept <= 1500 + 3 * 4 * 32 * 3
            assert any("session_history_bytes" in m for m in caplog.messages)
            _check_gru(gru_full, [xs[:3]], [rs])
            assert wait_for(lambda: metric(cloud, "edgesplit_sessions_evicted_total", {"reason": "idle"}) >= 1)
            with pytest.raises(SessionLostError, match="start a new session"):
                s.step({"x": xs[3]})
        with agent.session() as fresh:  # nothing else is disturbed
            assert fresh.step({"x": xs[0]}).where == "cloud"


def test_the_memory_budget_evicts_the_least_recently_used_session(repo, gru_full, caplog):
    root, _, gru = repo
    per_session = 1 * 2 * 32 * 4  # the tail keeps h0.1: [1, batch 2, 32] float32
    xs = [gru_inputs(300 + i, 3) for i in range(3)]
    caplog.set_level(logging.WARNING, logger="cloud_server.sessions")
    with RealCloud(root, session_memory_bytes=2 * per_session + 10) as cloud, \
            agent_for(gru, cloud.address) as agent:
        a, b, c = agent.session(), agent.session(), agent.session()
        rs = {0: [a.step({"x": xs[0][0]})], 1: [b.step({"x": xs[1][0]})]}
        assert wait_for(lambda: metric(cloud, "edgesplit_sessions") == 2)
        rs[2] = [c.step({"x": xs[2][0]})]  # a is the least recently used: evicted
        assert wait_for(lambda: metric(cloud, "edgesplit_sessions_evicted_total", {"reason": "memory"}) == 1)
        rs[1].append(b.step({"x": xs[1][1]}))  # b was kept: no replay
        rs[0].append(a.step({"x": xs[0][1]}))  # a is rebuilt (and evicts c)
        for s in (a, b, c):
            s.close()
    assert rs[1][1].replayed == 0 and rs[0][1].replayed == 1 and rs[0][1].where == "cloud"
    for i in (0, 1):
        for want, r in zip(gru_reference(gru_full, xs[i][:2]), rs[i]):
            np.testing.assert_allclose(r["y"], want, rtol=0, atol=1e-5)
    assert any("evicted" in m and "memory budget" in m for m in caplog.messages)


# -- bad input at the wire ---------------------------------------------------------------------
class Wire:
    """A bare DEALER speaking the protocol to the broker, as a client other than the SDK would."""

    def __init__(self, address: str, bundle):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(address)
        self.bundle = bundle
        self.raw = codecs.get_codec("raw")
        self.n = 0

    def step(self, x: np.ndarray, session=None, step=None, client=None, **extra) -> protocol.Message:
        """Send the head's output for `x` (computed here) as a session step; the reply."""
        self.n += 1
        meta = {k: v for k, v in (("session", session), ("step", step), ("client", client)) if v is not None}
        msg = protocol.infer(f"w-{self.n}", self.bundle.id, 1, {"gru.0.y": self.raw.encode(x)}, deadline_ms=10_000,
                             **meta, **extra)
        protocol.send(self.sock, msg)
        return self.reply()

    def reply(self) -> protocol.Message:
        assert self.sock.poll(20_000), "no reply"
        return protocol.recv(self.sock)[1]

    def close(self):
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture(scope="module")
def gru_head(repo):
    from edgesplit.runtime import SegmentRunner

    _, _, gru = repo
    seg = SegmentRunner(gru, "ort-cpu")
    xs = gru_inputs(11, 4, batch=1)
    state = {"h0.0": np.zeros((1, 1, 32), np.float32)}
    mids = []
    for x in xs:
        mid, state = seg.step({"x": x}, 0, 1, state)
        mids.append(mid["gru.0.y"])
    return xs, mids


def test_wire_session_errors_leave_everything_else_alone(repo, gru_full, gru_head):
    root, _, gru = repo
    xs, mids = gru_head
    want = gru_reference(gru_full, xs)
    sid, me, other = "a" * 32, "1" * 32, "2" * 32
    with RealCloud(root) as cloud:
        w = Wire(cloud.address, gru)
        try:
            # an unknown (or expired) session beyond step 0: the worker holds nothing
            r = w.step(mids[0], "f" * 32, 3, me)
            assert (r.kind, r.meta["code"], r.meta["have"]) == ("error", "session_state", 0)
            r = w.step(mids[0], sid, 0, me)
            assert r.kind == "result" and r.meta["step"] == 0
            np.testing.assert_allclose(codecs.decode(r.tensors["y"]), want[0], atol=1e-5, rtol=0)
            # out of order: the worker says where it is
            r = w.step(mids[2], sid, 2, me)
            assert (r.meta["code"], r.meta["have"]) == ("session_state", 1)
            # another client's session id, even at step 0: forbidden, the session untouched
            for step in (1, 0):
                r = w.step(mids[1], sid, step, other)
                assert r.meta["code"] == "forbidden", r.meta
            protocol.send(w.sock, protocol.session_end("end", sid, other))  # not theirs to end either
            r = w.step(mids[1], sid, 1, me)
            assert r.kind == "result"
            np.testing.assert_allclose(codecs.decode(r.tensors["y"]), want[1], atol=1e-5, rtol=0)
            # session_end by its client drops it
            protocol.send(w.sock, protocol.session_end("end", sid, me))
            assert wait_for(lambda: not cloud.server.threads[0][0]._tail.sessions.__contains__(sid))
            r = w.step(mids[2], sid, 2, me)
            assert (r.meta["code"], r.meta["have"]) == ("session_state", 0)
            # malformed session fields are bad requests, like any header field
            for bad in (dict(session="xyz", step=0, client=me), dict(session=sid.upper(), step=0, client=me),
                        dict(session=sid, step="1", client=me), dict(session=sid, step=-1, client=me),
                        dict(session=sid, step=True, client=me), dict(session=sid, step=0),
                        dict(session=sid, step=0, client="c" * 33), dict(step=0), dict(client=me)):
                r = w.step(mids[0], **bad)
                assert (r.kind, r.meta["code"]) == ("error", "bad_request"), bad
            # a stateless request of a stateful tail is refused clearly (it has no state to run with)
            r = w.step(mids[0])
            assert (r.meta["code"], "send its steps in a session" in r.meta["message"]) == ("bad_request", True)
            # and after all that the session steps on as if nothing had happened
            r = w.step(mids[0], sid, 0, me)
            r = w.step(mids[1], sid, 1, me)
            np.testing.assert_allclose(codecs.decode(r.tensors["y"]), want[1], atol=1e-5, rtol=0)
        finally:
            w.close()


def test_session_fields_are_checked_by_the_protocol():
    sid, me = "0123456789abcdef" * 2, "f" * 32
    msg = protocol.infer("r", "b", 1, {}, session=sid, step=5, client=me)
    back = protocol.decode(protocol.encode(msg))
    assert protocol.session_fields({"id": "r", **back.meta}) == (sid, 5, me)
    assert protocol.session_fields({"id": "r"}) is None
    end = protocol.decode(protocol.encode(protocol.session_end("e", sid, me)))
    assert end.kind == "session_end" and protocol.session_fields(end.meta, "session_end") == (sid, -1, me)
    for bad in (dict(session=sid, step=2 ** 40, client=me), dict(session=sid, step=1.0, client=me),
                dict(session=sid[:-1], step=0, client=me), dict(session=sid, step=0, client=None)):
        with pytest.raises(protocol.MessageError):
            protocol.decode(protocol.encode(protocol.infer("r", "b", 1, {}, **{k: v for k, v in bad.items()
                                                                               if v is not None})))
    with pytest.raises(protocol.MessageError):
        protocol.decode(protocol.encode(protocol.Message("session_end", "e", meta={"client": me})))
    assert {"session_state", "forbidden"} <= protocol.ERROR_CODES and "session_end" in protocol.KINDS


def test_the_session_store_orders_steps_and_budgets_memory():
    from cloud_server.sessions import SessionRefused, SessionStore

    now = [0.0]
    store = SessionStore(idle_s=10.0, budget_bytes=100, name="t", clock=lambda: now[0])
    fresh = lambda: {"h": np.zeros(10, np.float32)}  # noqa: E731 - 40 bytes
    for sid in ("a", "b"):
        st = store.begin(sid, "me", 0, "bundle", 1, fresh)
        store.commit(sid, "me", 0, "bundle", 1, {"h": st["h"] + 1})
    with pytest.raises(SessionRefused) as err:
        store.begin("a", "me", 2, "bundle", 1, fresh)
    assert (err.value.code, err.value.have) == ("session_state", 1)
    with pytest.raises(SessionRefused, match="another client"):
        store.begin("a", "you", 0, "bundle", 1, fresh)
    with pytest.raises(SessionRefused, match="runs bundle"):
        store.begin("a", "me", 1, "other", 1, fresh)
    assert store.begin("a", "me", 1, "bundle", 1, fresh)["h"][0] == 1
    store.commit("c", "me", 0, "bundle", 1, fresh())  # 120 bytes: the least recently used (a) goes
    assert "a" not in store and "b" in store and store.evicted == {"memory": 1, "idle": 0}
    now[0] = 11.0
    assert store.report() == {"count": 0, "bytes": 0, "evicted": {"memory": 1, "idle": 2}}
