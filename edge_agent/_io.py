"""The agent's I/O thread: one loop that owns every socket, sends requests, reads replies and runs the timers.

It alone decides whether a request still waits for the cloud, so a request is answered exactly
once: when it gives up on the cloud it forgets the request first, and a later cloud reply is
dropped as late. Other threads talk to it only through `post()` (a command queue and a wake-up
pipe). Per-server state lives in ServerLink (edge_agent/_link.py); this loop ties it to the
requests: dispatch to the least loaded usable server, re-route the requests of a link that went
down or was banned, and check every reply (edge_agent/_checks.py) before it answers anything.
"""

from __future__ import annotations

import collections
import heapq
import logging
import math
import os
import threading
import time
from typing import Sequence

import zmq

from edgesplit import protocol
from edgesplit.bundle import Bundle
from edgesplit.errors import CodecError, DeadlineExceeded, EdgeSplitError, LinkDownError, ProtocolError, RemoteError, UserError

from edge_agent._auto import AutoCut
from edge_agent._checks import ReplyCheck
from edge_agent._link import ServerLink
from edge_agent._requests import Request, Requests
from edge_agent._results import InferenceResult
from edge_agent.config import AgentConfig

__all__ = ["IOLoop"]

log = logging.getLogger("edge_agent")


class IOLoop:
    """The I/O thread and everything only it touches: sockets, pending requests, timers.

    Args:
        bundle: the bundle the requests run.
        servers: broker addresses.
        config: the agent's settings.
        requests: the request life cycle (answers, counters, local fallback).
        auto: the cut chooser's estimates, fed from replies and pongs.
    """

    def __init__(self, bundle: Bundle, servers: Sequence[str], config: AgentConfig, requests: Requests,
                 auto: AutoCut):
        self.bundle = bundle
        self.config = config
        self._requests = requests
        self._auto = auto
        self._check = ReplyCheck(bundle, requests.is_ours, config.limits)
        self._limits = config.limits
        self.ctx = zmq.Context()
        # Every socket of this context (one pair per server, made in _link) gets the bound: libzmq
        # drops a server's connection that sends a frame bigger than the bundle's outputs at
        # max_request_batch, before buffering it (the link then goes down like any lost connection).
        self.socket_bound = protocol.max_frame_bytes(bundle.outputs, config.max_request_batch, config.limits)
        self.ctx.setsockopt(zmq.MAXMSGSIZE, self.socket_bound)
        self._poller = zmq.Poller()
        self.links = [ServerLink(a, i, config, self.ctx, self._poller, bundle.id, requests.count)
                      for i, a in enumerate(servers)]
        self._pending: dict[str, Request] = {}
        self._timers: list[tuple[float, int, Request]] = []
        self._waiting: collections.deque[Request] = collections.deque()
        self._cmds: collections.deque = collections.deque()
        self.eligible = False        # some server is up, holds the bundle and is not banned
        self.alive = True
        self.became_eligible = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poller.register(self._wake_r, zmq.POLLIN)
        self._thread = threading.Thread(target=self._main, name="edgesplit-agent-io", daemon=True)
        self._thread.start()

    def connected(self) -> bool:
        return self.eligible and self.alive

    def least_wait_ms(self) -> float:
        """The least queueing delay an up server reported (0 with none)."""
        waits = [float(s.load.get("est_wait_ms") or 0.0) for s in self.links if s.state == "up"]
        return min(waits) if waits else 0.0

    # --- commands from other threads

    def post(self, cmd) -> None:
        """Queue ("send", request) or ("stop", None) for the I/O thread and wake it."""
        self._cmds.append(cmd)
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already
        if not self.alive and cmd[0] == "send":
            self._drain_dead()

    def stop(self) -> None:
        """Stop the thread (it fails over what is still pending), then release the pipe."""
        self.post(("stop", None))
        self._thread.join()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _drain_dead(self) -> None:
        # The I/O thread is gone: whatever is still queued is finished here.
        while True:
            try:
                op, req = self._cmds.popleft()
            except IndexError:
                return
            if op == "send":
                self._requests.give_up_cloud(req, "agent I/O stopped", LinkDownError("the agent's I/O thread stopped"))

    def _process_commands(self) -> bool:
        while True:
            try:
                op, req = self._cmds.popleft()
            except IndexError:
                return False
            if op == "stop":
                return True
            if op == "send":
                self._dispatch(req)
            elif op == "notify":  # a message nobody answers (session_end) to every up server
                for s in self.links:
                    if s.state == "up" and s.sock is not None:
                        try:
                            s.send(req)
                        except ProtocolError:
                            pass

    # --- the loop

    def _main(self) -> None:
        now = time.perf_counter()
        for s in self.links:
            s.next_attempt = now
        try:
            timeout = 0.0
            while True:
                events = dict(self._poller.poll(max(0, math.ceil(timeout * 1e3))))
                # Messages first, timers after: after a stall (a busy CPU) the pongs waiting in
                # the sockets prove the servers alive before the silence check runs.
                if self._wake_r in events:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                if self._process_commands():
                    break
                for s in self.links:
                    for mon in s.monitors:
                        if mon in events and mon in s.monitors:
                            reason = s.read_monitor(mon)
                            if reason:
                                self._down(s, time.perf_counter(), reason)
                    for sock in (s.ctrl, s.sock):
                        if sock is not None and sock in events:
                            self._read(s, sock)
                timeout = self._run_timers(time.perf_counter())
        except Exception:  # noqa: BLE001 - a bug here must not strand requests
            log.exception("edge agent I/O thread failed; finishing every request on the device")
        finally:
            self.alive = False
            self.eligible = False
            give_up = self._requests.give_up_cloud
            for req in list(self._pending.values()):
                self._forget(req)
                give_up(req, "agent stopped", EdgeSplitError("the agent was closed"))
            while self._waiting:
                give_up(self._waiting.popleft(), "agent stopped", EdgeSplitError("the agent was closed"))
            self._drain_dead()
            for s in self.links:
                s.close()
            self.ctx.term()

    def _run_timers(self, now: float) -> float:
        """Fire due timers; return seconds until the next one."""
        nxt = now + self.config.heartbeat_interval_ms / 1e3
        for s in self.links:
            if s.overdue(now):
                self._read_waiting(s)  # something came in meanwhile: read it before judging
            wake, down, usable_again = s.fire(now)
            if down:
                self._down(s, now, down)
                wake = s.next_attempt
            elif usable_again:
                self._update_eligible(now)
            nxt = min(nxt, wake)
        count = self._requests.count
        while self._timers and self._timers[0][0] <= now:
            _, _, req = heapq.heappop(self._timers)
            if req.id in self._pending and req.cloud_deadline <= now:
                self._cancel_remote(req)
                self._forget(req)
                count("deadline_missed")
                log.debug("request %s missed its cloud deadline", req.id)
                self._give_up(req, "deadline", DeadlineExceeded(f"request {req.id}: no answer in time"))
        for req in [r for r in self._waiting if r.deadline <= now]:
            self._waiting.remove(req)
            self._give_up(req, "deadline", DeadlineExceeded(f"request {req.id}: no server came back in time"))
        if self._timers:
            nxt = min(nxt, self._timers[0][0])
        if self._waiting:
            nxt = min(nxt, min(r.deadline for r in self._waiting))
        return nxt - time.perf_counter()

    # --- link transitions that touch requests

    def _update_eligible(self, now: float) -> None:
        ok = any(s.usable(now) for s in self.links)
        self.eligible = ok
        if ok:
            self.became_eligible.set()
            while self._waiting:
                self._dispatch(self._waiting.popleft())
        else:
            self.became_eligible.clear()

    def _up(self, s: ServerLink, now: float) -> None:
        s.mark_up(now)
        self._update_eligible(now)

    def _down(self, s: ServerLink, now: float, reason: str) -> None:
        s.mark_down(now, reason)
        self._update_eligible(now)
        self._reroute_all(s, reason)

    def _ban(self, s: ServerLink, now: float, reason: str) -> None:
        s.ban(now, reason)
        self._update_eligible(now)
        self._reroute_all(s, f"bad reply from {s.address}")

    # --- requests

    def _pick(self, now: float, exclude: ServerLink | None = None) -> ServerLink | None:
        best = None
        for s in self.links:
            if s is exclude or not s.usable(now):
                continue
            key = (len(s.inflight) + float(s.load.get("est_wait_ms") or 0.0) / 10.0, s.index)
            if best is None or key < best[0]:
                best = (key, s)
        return best[1] if best else None

    def _dispatch(self, req: Request, exclude: ServerLink | None = None) -> None:
        if req.done:
            return
        now = time.perf_counter()
        s = self._pick(now, exclude)
        if req.prefer is not None and s is not None:  # a session stays with the broker that holds it
            p = self.links[req.prefer]
            if p is not exclude and p.usable(now):
                s = p
        if s is None:
            self._no_server(req)
            return
        if req.batch > self.config.max_request_batch:  # its reply could not pass the socket bound
            self._requests.count("over_max_request_batch")
            self._give_up(req, "batch over max_request_batch", UserError(
                f"request {req.id}: batch {req.batch} is over AgentConfig.max_request_batch "
                f"({self.config.max_request_batch})"))
            return
        remaining_ms = (req.cloud_deadline - now) * 1e3
        if remaining_ms <= 0:
            self._requests.count("deadline_missed")
            self._give_up(req, "deadline", DeadlineExceeded(f"request {req.id}: no time left for the cloud"))
            return
        try:
            msg = protocol.infer(req.id, self.bundle.id, req.cut, req.encoded, deadline_ms=remaining_ms,
                                 reply_codec=self.config.reply_codec, **(req.meta or {}))
            sent = s.send(msg)
        except ProtocolError as exc:  # nothing a server could answer: finish it here
            log.error("request %s cannot be encoded: %s", req.id, exc)
            self._give_up(req, "cannot encode", exc)
            return
        if not sent:
            # the send queue is full: the server is not keeping up; try another or give up
            self._requests.count("send_full")
            other = self._pick(now, s)
            if other is None or not other.send(msg):
                self._no_server(req)
                return
            s = other
        req.server = s
        req.sent_to.add(s.index)
        req.sent_at = now
        s.expect_transfer(now, req.bytes_up, self._auto.estimates(0.0)[0])  # a busy link is not a dead one
        req.attempts += 1
        if req.attempts > 1:
            self._requests.count("resent")
        s.inflight[req.id] = req
        if req.id not in self._pending:
            self._pending[req.id] = req
            heapq.heappush(self._timers, (req.cloud_deadline, req.seq, req))

    def _cancel_remote(self, req: Request) -> None:
        """Tell the server we no longer want this answer (best effort: it may be computing)."""
        s = req.server
        if s is not None and s.sock is not None and req.id in s.inflight:
            try:
                s.send(protocol.cancel(req.id))
            except ProtocolError:
                pass

    def _forget(self, req: Request) -> None:
        self._pending.pop(req.id, None)
        if req.server is not None:
            req.server.inflight.pop(req.id, None)
            if req.sent_at:
                req.waited_ms += (time.perf_counter() - req.sent_at) * 1e3
                req.sent_at = 0.0

    def _reroute_all(self, s: ServerLink, reason: str) -> None:
        for req in list(s.inflight.values()):
            self._reroute(req, s, reason)

    def _reroute(self, req: Request, failed: ServerLink, reason: str) -> None:
        """A failed hop: resend to another live server, or finish per the fallback policy."""
        self._forget(req)
        now = time.perf_counter()
        if req.attempts <= self.config.max_resends and req.cloud_deadline > now and self._pick(now, failed):
            self._dispatch(req, exclude=failed)
        else:
            self._no_server(req, reason)

    def _no_server(self, req: Request, reason: str = "link down") -> None:
        self._forget(req)
        if self.config.fallback == "wait" and not self._requests.closed:
            self._waiting.append(req)  # held until a server can take it, or its deadline
            return
        self._give_up(req, reason, LinkDownError(f"request {req.id}: {reason}"))

    def _give_up(self, req: Request, reason: str, exc: BaseException) -> None:
        self._requests.give_up_cloud(req, reason, exc)

    # --- messages

    def _read_waiting(self, s: ServerLink) -> None:
        for sock in (s.ctrl, s.sock):
            if sock is not None and s.sock is not None and sock.poll(0, zmq.POLLIN):
                self._read(s, sock)

    def _read(self, s: ServerLink, sock: zmq.Socket) -> None:
        for _ in range(256):
            if s.sock is None:  # closed while reading (the server went down)
                return
            try:
                _, msg = protocol.recv(sock, self._limits, flags=zmq.NOBLOCK)
                bad = None
            except zmq.Again:
                return
            except ProtocolError as exc:  # the whole message was read: the next one is intact
                msg, bad = None, exc
            now = time.perf_counter()
            s.heard(now)  # any message is life (the link's failure detector)
            if bad is not None:
                self._ban(s, now, f"undecodable message ({bad})")
            elif msg.kind == "pong":
                rtt_s = s.on_pong(msg, now)
                if rtt_s is not None:
                    self._auto.observe_rtt(rtt_s)
                self._up(s, now)
            elif msg.kind == "welcome":
                self._auto.set_cloud_profile(s.on_welcome(msg, self.bundle.name))
                self._up(s, now)
            elif msg.kind in ("result", "error"):
                self._on_reply(s, msg, now)
            else:
                log.debug("ignoring a %r message from %s", msg.kind, s.address)

    def _on_reply(self, s: ServerLink, msg: protocol.Message, now: float) -> None:
        req = self._pending.get(msg.id)
        misfit = self._check.misfit(msg.id, req, s.index)
        if misfit == "late":
            self._requests.count("late_replies")
        if misfit in ("ignore", "late"):
            return
        if misfit:
            self._ban(s, now, misfit)
            return
        if msg.kind == "error":
            self._on_error(s, req, msg, now)
            return
        try:
            outs, decode_ms = self._check.outputs(msg, req.binding)
        except (ProtocolError, CodecError, UserError) as exc:
            self._ban(s, now, f"reply to {msg.id} rejected: {exc}")
            return
        s.good_reply()
        rt_ms = (now - req.sent_at) * 1e3 if req.sent_at else 0.0
        req.sent_at = 0.0  # this wait is network time, not time wasted on a failed hop
        self._forget(req)
        srv_ms = self._check.server_ms(msg)
        network = max(0.0, rt_ms - sum(srv_ms.values()))
        self._auto.observe_exchange(req.cut, req.bytes_up, msg.payload_nbytes, network,
                                    srv_ms["compute_ms"] / max(1, req.batch))
        req.timings.update(network=network + req.waited_ms, tail=srv_ms["compute_ms"], queue=srv_ms["queue_ms"],
                           decode=decode_ms)
        self._requests.finish(req, InferenceResult(outs, "cloud", req.cut, self._requests.timings(req),
                                                   s.address, None))

    def _on_error(self, s: ServerLink, req: Request, msg: protocol.Message, now: float) -> None:
        code = str(msg.meta.get("code", "internal"))
        text = str(msg.meta.get("message", ""))
        self._requests.count(f"remote_{code}")
        err = RemoteError(code, text, msg.meta.get("retry_after_ms"))
        err.meta = msg.meta  # the code's own fields (session_state: have)
        # busy: the server asked for a pause; route around it for that long (not a bad server)
        if code == "busy" and s.pause(now, msg.meta.get("retry_after_ms")):
            self._update_eligible(now)
        if code == "unknown_bundle":
            log.warning("server %s does not hold bundle %s: %s", s.address, self.bundle.id[:12], text)
            s.held = False
            self._update_eligible(now)
        elif code not in RemoteError.RETRYABLE and code not in ("deadline", "session_state"):
            log.warning("server %s refused request %s: %s", s.address, req.id, err)
        if code == "deadline":
            self._forget(req)
            self._give_up(req, "deadline", DeadlineExceeded(f"request {req.id}: {text or 'deadline'}"))
        elif err.retryable or code == "unknown_bundle":
            self._reroute(req, s, f"server error {code}")
        else:
            self._forget(req)
            self._give_up(req, f"server error {code}", err)
