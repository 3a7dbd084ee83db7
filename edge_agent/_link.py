"""ServerLink: one cloud server as the agent sees it — its two connections and its up/down state machine.

    down --probe--> connecting --pong/welcome--> up --silence, closed TCP, failed handshake--> down
                        \\--no answer in probe_timeout_ms--> down (reconnect backoff, with jitter)

"banned" is "up" with `banned_until` in the future: the server is alive but gets no requests,
because it sent a bad reply (exponential ban) or asked for a pause (a `busy` error).

"Silence" is judged by an adaptive failure detector (edgesplit.liveness, phi accrual): any
message on either connection is life, the limit grows when pongs come late (a loaded box, a
backlog on a slow link) and while a request is still leaving (its expected transfer time from
the bandwidth estimate), and it never passes liveness_max_silence_ms.

A ServerLink knows nothing about requests beyond counting them (`inflight`); the I/O loop
(edge_agent/_io.py) re-routes them when a link goes down or is banned. Only the I/O thread
touches a ServerLink, except `stats()`, a snapshot for link_stats().
"""

from __future__ import annotations

import itertools
import logging
import random
from typing import Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from edgesplit import protocol
from edgesplit.liveness import FailureDetector

from edge_agent._results import ServerStats
from edge_agent.config import AgentConfig

__all__ = ["ServerLink"]

log = logging.getLogger("edge_agent")

_MONITOR_EVENTS = (zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                   | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class ServerLink:
    """One server's connections, liveness, backoff and ban.

    Args:
        address: "tcp://host:port".
        index: its place in the agent's server list (a request remembers where it went by it).
        config: the agent's settings (heartbeat, probe, reconnect, ban, CURVE, send_hwm).
        ctx: the ZeroMQ context of the I/O thread.
        poller: the I/O thread's poller; the link registers its sockets there.
        bundle_id: what the hello asks the server about.
        count: adds to the agent's counters ("link_down", "bad_replies", "handshake_failed").
    """

    def __init__(self, address: str, index: int, config: AgentConfig, ctx: zmq.Context, poller: zmq.Poller,
                 bundle_id: str, count: Callable[[str], None]):
        self.address = address
        self.index = index
        self.config = config
        self._ctx = ctx
        self._poller = poller
        self._bundle_id = bundle_id
        self._count = count
        self._ids = itertools.count(1)
        self.state = "down"
        # Two connections per server: `sock` carries requests and replies, `ctrl` the hello and
        # the pings. A big request on a slow link then never holds a pong back, so silence on
        # `ctrl` means the link is gone, not that it is busy.
        self.sock: zmq.Socket | None = None
        self.ctrl: zmq.Socket | None = None
        self.monitors: list[zmq.Socket] = []
        self.last_seen = 0.0
        self.liveness: FailureDetector | None = None  # made fresh for every connection (probe)
        self._sending_until = 0.0  # when the requests sent so far should have left, at the estimated rate
        self.next_ping = 0.0
        self.probe_deadline = 0.0
        self.next_attempt = 0.0
        self.backoff_ms = 0.0
        self.banned_until = 0.0
        self.ban_ms = 0.0
        self.held: bool | None = None      # does it hold our bundle (None: it did not say)
        self.profile: dict | None = None   # its per-segment times, from the welcome
        self.load: dict = {}               # from its last pong: workers, est_wait_ms, ...
        self.rtt_ms: float | None = None
        self.inflight: dict = {}           # request id -> request sent here and not answered
        self.pings: dict[str, float] = {}  # ping id -> when sent
        self.handshake_failed = False

    # --- sockets

    def _dealer(self, hwm: int) -> zmq.Socket:
        cfg = self.config
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.HEARTBEAT_IVL, max(1, int(cfg.heartbeat_interval_ms)))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(1, int(cfg.zmq_heartbeat_timeout_ms)))
        sock.setsockopt(zmq.HEARTBEAT_TTL, min(6553599, max(100, int(cfg.heartbeat_ttl_ms))))
        sock.setsockopt(zmq.RECONNECT_IVL, max(1, int(cfg.reconnect_initial_ms)))
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, max(1, int(cfg.reconnect_max_ms)))
        if cfg.curve_server_key:
            sock.curve_serverkey = _key(cfg.curve_server_key)
            sock.curve_publickey = _key(cfg.curve_public_key)
            sock.curve_secretkey = _key(cfg.curve_secret_key)
        mon = sock.get_monitor_socket(_MONITOR_EVENTS)
        sock.connect(self.address)
        self.monitors.append(mon)
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(mon, zmq.POLLIN)
        return sock

    def open(self) -> None:
        self.sock = self._dealer(self.config.send_hwm)
        self.ctrl = self._dealer(64)

    def close(self) -> None:
        for sock in (self.sock, self.ctrl):
            if sock is None:
                continue
            self._poller.unregister(sock)
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
            sock.close(linger=0)
        for mon in self.monitors:
            self._poller.unregister(mon)
            mon.close(linger=0)
        self.sock = self.ctrl = None
        self.monitors = []
        self.pings.clear()

    def send(self, msg: protocol.Message, ctrl: bool = False) -> bool:
        """Send without blocking; False when the send queue is full. Raises ProtocolError if `msg` cannot be encoded."""
        try:
            protocol.send(self.ctrl if ctrl else self.sock, msg, flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def read_monitor(self, mon: zmq.Socket) -> str | None:
        """Read the connection events of `mon`; why the link is down, or None if it is not."""
        while True:
            try:
                event = recv_monitor_message(mon, flags=zmq.NOBLOCK)["event"]
            except zmq.Again:
                return None
            if event == zmq.EVENT_DISCONNECTED:
                return "connection closed"
            if event & (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
                if not self.handshake_failed:  # once, not on every reconnect attempt
                    log.warning("handshake with %s failed: %s", self.address,
                                "the server refused this agent's CURVE key" if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                else "the peer does not speak ZMTP with matching security (CURVE keys?)")
                self.handshake_failed = True
                self._count("handshake_failed")
                return "handshake failed"
            if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                # usually the connection closed mid-handshake (a proxy whose server is gone)
                log.debug("handshake with %s did not complete", self.address)
                return "handshake did not complete"

    # --- liveness

    def _detector(self, now: float) -> FailureDetector:
        cfg = self.config
        interval = cfg.heartbeat_interval_ms / 1e3
        # never down before heartbeat_misses intervals (5 % early, so that the I/O loop's
        # wake-up latency still lands within that promise on a quiet machine)
        floor = interval * cfg.heartbeat_misses * 0.95
        return FailureDetector(interval, cfg.liveness_threshold, cfg.liveness_min_std_ms / 1e3, floor,
                               max(floor, cfg.liveness_max_silence_ms / 1e3), now=now)

    def heard(self, now: float) -> None:
        """A message arrived on either connection: the server is alive."""
        self.last_seen = now
        if self.liveness is not None:
            self.liveness.heartbeat(now)

    def expect_transfer(self, now: float, nbytes: int, bandwidth_bps: float) -> None:
        """A request of `nbytes` was queued: its bytes (and those queued before) leave at the
        estimated rate, and no pong need come back sooner than that plus an RTT."""
        if self.liveness is None or not bandwidth_bps > 0:
            return
        self._sending_until = max(self._sending_until, now) + nbytes * 8 / bandwidth_bps
        self.liveness.expect_traffic(self._sending_until + (self.rtt_ms or 0.0) / 1e3)

    def dead_after(self) -> float:
        """When silence since `last_seen` means the server is gone: the one liveness decision."""
        if self.liveness is None:
            return self.last_seen + self.config.heartbeat_interval_ms / 1e3 * self.config.heartbeat_misses
        return self.liveness.deadline()

    def overdue(self, now: float) -> bool:
        """A verdict is due (silent while up, or the probe timed out): read what came in before judging."""
        return (self.state == "up" and now > self.dead_after()) or (
            self.state == "connecting" and now >= self.probe_deadline)

    def fire(self, now: float) -> tuple[float, str | None, bool]:
        """Run the link's due timers: ping, probe, ban expiry.

        Returns (when to call again, why the link is down now or None, whether it became usable).
        """
        if self.state == "up":
            if now > self.dead_after():
                why = self.liveness.describe(now) if self.liveness is not None else \
                    f"{(now - self.last_seen) * 1e3:.0f} ms silent"
                return now, f"no heartbeat ({why})", False
            if now >= self.next_ping:
                self.ping(now)
            wake = min(self.next_ping, self.dead_after() + 1e-4)
            if self.banned_until > now:
                return min(wake, self.banned_until), None, False
            if self.banned_until:
                self.banned_until = 0.0
                return wake, None, True
            return wake, None, False
        if self.state == "connecting":
            if now >= self.probe_deadline:
                return now, "no answer to the reconnect probe", False
            return self.probe_deadline, None, False
        if now >= self.next_attempt:
            self.probe(now)
            return self.probe_deadline, None, False
        return self.next_attempt, None, False

    def probe(self, now: float) -> None:
        """A reconnect attempt: fresh sockets, hello (learn held/profile) and ping."""
        self.open()
        self.liveness = self._detector(now)  # a new connection: learn the server again
        self._sending_until = 0.0
        self.state = "connecting"
        self.probe_deadline = now + self.config.probe_timeout_ms / 1e3
        self.send(protocol.hello(f"h{next(self._ids)}", bundle=self._bundle_id), ctrl=True)
        self.ping(now, measure=False)  # its RTT includes connection setup: not a sample

    def ping(self, now: float, measure: bool = True) -> None:
        pid = f"p{next(self._ids)}"
        if self.send(protocol.ping(pid), ctrl=True) and measure:
            self.pings[pid] = now
        if len(self.pings) > 64:  # pongs that never came
            for k in sorted(self.pings, key=self.pings.get)[:32]:
                del self.pings[k]
        self.next_ping = now + self.config.heartbeat_interval_ms / 1e3

    def on_pong(self, msg: protocol.Message, now: float) -> float | None:
        """A pong: the load it reports; returns its RTT sample in seconds (None if not a sample)."""
        sent = self.pings.pop(msg.id, None)
        rtt_s = None
        if sent is not None:
            rtt = (now - sent) * 1e3
            self.rtt_ms = rtt if self.rtt_ms is None else self.rtt_ms + self.config.ewma_alpha * (rtt - self.rtt_ms)
            rtt_s = rtt / 1e3
            if self.liveness is not None:
                # the pongs of the pings sent since may take as long as this one (a backlog on a
                # slow link, a loaded server): silence counts from then
                self.liveness.expect_traffic(now + rtt_s)
        load = msg.meta.get("load")
        if isinstance(load, dict):
            if load.get("workers", 1) == 0 and self.load.get("workers", 1) != 0:
                log.warning("server %s has no live worker; not sending it requests", self.address)
            self.load = load
        return rtt_s

    def on_welcome(self, msg: protocol.Message, bundle_name: str) -> list | None:
        """The answer to hello: does it hold the bundle; returns its per-segment times if it sent them."""
        held = msg.meta.get("held")
        self.held = bool(held) if held is not None else None
        prof = msg.meta.get("profile")
        segment_ms = None
        if isinstance(prof, dict):
            self.profile = prof
            segment_ms = prof.get("segment_ms")
        if isinstance(msg.meta.get("load"), dict):
            self.load = msg.meta["load"]
        if self.held is False:
            log.warning("server %s does not hold bundle %s (%s); not sending it requests",
                        self.address, bundle_name, self._bundle_id[:12])
        return segment_ms

    # --- transitions

    def mark_up(self, now: float) -> None:
        if self.state != "up":
            log.info("server %s is up%s", self.address,
                     "" if self.held is not False else " but does not hold this bundle")
            self.state = "up"
            self.backoff_ms = 0.0
            self.handshake_failed = False
            self.next_ping = now  # a first RTT sample right away (the probe's own ping is not one)

    def mark_down(self, now: float, reason: str) -> None:
        """Close the connections and schedule the next probe (exponential backoff with jitter)."""
        was_up = self.state == "up"
        self.close()
        cfg = self.config
        if was_up:
            log.warning("server %s is down (%s)", self.address, reason)
            self._count("link_down")
            self.backoff_ms = 0.0
        self.backoff_ms = (cfg.reconnect_initial_ms if not self.backoff_ms
                           else min(self.backoff_ms * cfg.reconnect_multiplier, cfg.reconnect_max_ms))
        delay = self.backoff_ms * (1 + cfg.reconnect_jitter * (2 * random.random() - 1))
        self.state = "down"
        self.next_attempt = now + delay / 1e3

    def ban(self, now: float, reason: str) -> None:
        """A bad reply: no requests for ban_initial_ms, doubled for each further one (up to ban_max_ms)."""
        cfg = self.config
        self.ban_ms = cfg.ban_initial_ms if not self.ban_ms else min(self.ban_ms * 2, cfg.ban_max_ms)
        self.banned_until = now + self.ban_ms / 1e3
        self._count("bad_replies")
        log.warning("bad reply from %s: %s; no requests to it for %.0f ms", self.address, reason, self.ban_ms)

    def pause(self, now: float, ms) -> bool:
        """The server asked for a pause (busy): route around it that long. False if `ms` is no pause."""
        if isinstance(ms, (int, float)) and 0 < ms < 60_000:
            self.banned_until = max(self.banned_until, now + ms / 1e3)
            return True
        return False

    def good_reply(self) -> None:
        self.ban_ms = 0.0  # the next bad reply starts the ban over

    def usable(self, now: float) -> bool:
        # A broker whose pong says it has no live worker could only hold our requests until
        # their deadline: it is up, but it gets none.
        return (self.state == "up" and self.held is not False and self.banned_until <= now
                and self.load.get("workers", 1) != 0)

    def stats(self, now: float) -> ServerStats:
        state = "banned" if self.state == "up" and self.banned_until > now else self.state
        return ServerStats(self.address, state, self.rtt_ms, dict(self.load), len(self.inflight), self.held)


def _key(k: str | bytes) -> bytes:
    return k.encode("ascii") if isinstance(k, str) else k
