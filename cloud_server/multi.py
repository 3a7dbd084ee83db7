"""A tail worker that serves several brokers at once: one DEALER per broker, one shared TailBatcher.

`edgesplit worker --connect tcp://A:PORT --connect tcp://B:PORT` runs one. No broker is a single
point of failure for it: each broker link has its own socket, clock map (cloud_server._wire.
ClockMap), failure detector and reconnect backoff, so a dead broker costs only its own link
while the others keep being served; the dead one is reconnected with backoff and used again
when it comes back.

Capacity is split, never promised twice: the worker's `worker_capacity` C is shared among the
links that are up (an even share each, the remainder to the first), and what each broker is
told in every status is what the worker can give it *now*: its share, less whatever another
broker holds beyond its own share (after a rebalance, until those requests are answered). So
the grants add up to at most C, except that each broker is given at least one slot (a worker
with fewer slots than brokers would otherwise starve one of them), and for the one message
delay a rebalance takes to reach a broker. A broker that is alone gets all C.

Replies find their broker by the key: a request's broker key is prefixed with its link's
index inside the worker (one byte) and stripped again on the way out. Requests still queued
for a broker that went away are dropped (nobody would take their answers).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from typing import Any

import zmq

from edgesplit import protocol as P

from cloud_server import _wire as W
from cloud_server.config import ServerConfig
from cloud_server.worker import TailWorker, admit_request

__all__ = ["MultiWorker", "split_capacity"]

log = logging.getLogger(__name__)
_SMALL = 2
_MAX_BROKERS = 255  # the link index is one byte of the key


def split_capacity(capacity: int, held: list[int], up: list[bool]) -> list[int]:
    """What each broker may send now: an even share of `capacity` among the links that are up,
    less what other brokers hold beyond their own shares; at least 1 for a link that is up, 0 for one that is down.

    Args:
        capacity: the worker's slots (ServerConfig.worker_capacity).
        held: requests each broker has in this worker now (queued or computing).
        up: whether each broker's link is up.
    """
    live = [i for i, u in enumerate(up) if u]
    share = [0] * len(up)
    for n, i in enumerate(live):
        share[i] = capacity // len(live) + (1 if n < capacity % len(live) else 0)
    grants = []
    for i in range(len(up)):
        if not up[i]:
            grants.append(0)
            continue
        others = sum(max(held[j], share[j]) for j in range(len(up)) if j != i)
        grants.append(max(1, min(capacity - others, capacity)))
    return grants


class _Link:
    """One broker: its socket, clock, failure detector, backoff and what it has in this worker."""

    def __init__(self, index: int, address: str, config: ServerConfig):
        self.index = index
        self.prefix = bytes([index])
        self.address = address
        self.sock: zmq.Socket | None = None
        self.clock = W.ClockMap()
        self.liveness = config.failure_detector(time.monotonic())
        self.backoff = config.reconnect_initial_s
        self.reopen_at = 0.0  # when a closed link opens again
        self.suspect_since: float | None = None
        self.last_send = self.last_heard = 0.0
        self.held: set[bytes] = set()  # prefixed keys of its requests in this worker
        self.sent_grant = -1
        self.sent_version = -1


class MultiWorker(TailWorker):
    """A tail worker connected to several brokers (see the module docstring).

    Args:
        connects: the brokers' worker addresses (1 to 255).
        repository / config / device / name / context / curve_server_key / curve_secret: as TailWorker.
    """

    def __init__(self, connects: list[str], repository: str | os.PathLike, config: ServerConfig = ServerConfig(),
                 device: str = "cpu", name: str | None = None, context: zmq.Context | None = None,
                 curve_server_key: str | os.PathLike | None = None, curve_secret: str | os.PathLike | None = None):
        connects = list(dict.fromkeys(connects))
        if not 1 <= len(connects) <= _MAX_BROKERS:
            from edgesplit.errors import ConfigError

            raise ConfigError(f"a worker serves 1 to {_MAX_BROKERS} brokers, got {len(connects)}")
        super().__init__(connects[0], repository, config, device, name, context, curve_server_key, curve_secret)
        self.links = [_Link(i, a, config) for i, a in enumerate(connects)]
        # the shared batcher answers through _route; received times arrive already on our clock
        self._tail.send = self._route
        self._tail._to_local = lambda t: t

    # -- capacity ------------------------------------------------------------------------------
    def grants(self) -> list[int]:
        """What each broker is told it may send now (split_capacity over the links)."""
        return split_capacity(self.config.worker_capacity, [len(l.held) for l in self.links],
                              [l.sock is not None and l.suspect_since is None for l in self.links])

    def link_status(self, link: _Link, grant: int, full: bool = False) -> dict:
        st = self.status(full=full)
        st["capacity"] = grant
        st["queued"] = sum(1 for j in self._tail.queue if j.rkey[:1] == link.prefix)
        return st

    # -- sending -------------------------------------------------------------------------------
    def _send_to(self, link: _Link, frames: list) -> None:
        with self._lock:
            if link.sock is None:
                return
            P.send_frames(link.sock, frames, _SMALL)
        link.last_send = time.monotonic()

    def _route(self, frames: list) -> None:
        """The batcher's answers: to the broker whose key it is, the key as that broker made it."""
        c = W.parse(frames[0])
        if c is None or c[0] != W.REPLY or len(c) < 2 or not isinstance(c[1], bytes) or not c[1]:
            return
        key = c[1]
        i = key[0]
        if i >= len(self.links):
            return
        link = self.links[i]
        link.held.discard(key)
        if self._trace is not None:
            self._trace.replied_parsed(key, c[2] if len(c) > 2 else None)
        self._send_to(link, [W.ctl(W.REPLY, key[1:], *c[2:]), *frames[1:]])
        self._last_send = time.monotonic()

    def _send(self, frames: list) -> None:
        """What the worker says to every broker (ready, draining, goodbye)."""
        for link in self.links:
            self._send_to(link, frames)
        self._last_send = time.monotonic()

    def heartbeat(self, now: float, every_s: float | None = None) -> bool:
        if self._said_goodbye():
            return False
        every = self.config.heartbeat_interval_s if every_s is None else every_s
        grants = self.grants()
        for link, grant in zip(self.links, grants):
            if link.sock is None:
                continue
            if (grant != link.sent_grant or link.sent_version != self._tail.version
                    or now - link.last_send >= every):
                link.sent_grant, link.sent_version = grant, self._tail.version
                self._send_to(link, [W.ctl(W.HEARTBEAT, self.link_status(link, grant))])
        return True

    def _heartbeat_loop(self) -> None:
        interval = self.config.heartbeat_interval_s
        while not self._done.wait(interval / 4):
            try:
                now = time.monotonic()
                for link, grant in zip(self.links, self.grants()):
                    if link.sock is not None and now - link.last_send >= interval:
                        self._send_to(link, [W.ctl(W.HEARTBEAT, self.link_status(link, grant))])
            except Exception:  # this thread must outlive any bug: it is what keeps us alive
                log.exception("%s: heartbeat failed", self.name)

    # -- the sockets ---------------------------------------------------------------------------
    def _open_link(self, link: _Link) -> None:
        s = self._dealer(link.address)
        now = time.monotonic()
        with self._lock:
            link.sock = s
        link.suspect_since = None
        link.liveness.reset(now)
        link.last_heard = now
        link.sent_grant = -1
        self._send_to(link, [W.ctl(W.READY, self.link_status(link, self.grants()[link.index], full=True))])

    def _close_link(self, link: _Link, why: str, now: float) -> None:
        log.warning("%s: broker %s %s; reconnecting in %.2f s", self.name, link.address, why, link.backoff)
        with self._lock:
            if link.sock is not None:
                link.sock.close(0)
            link.sock = None
        link.reopen_at = now + link.backoff
        link.backoff = min(link.backoff * 2, self.config.reconnect_max_s)
        # its queued requests have nobody to answer to now
        self._tail.queue = deque(j for j in self._tail.queue if j.rkey[:1] != link.prefix)
        link.held.clear()

    def _receive(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for any broker, then take everything they sent."""
        with self._lock:
            socks = [(l, l.sock) for l in self.links if l.sock is not None]
            ready = [(l, s) for l, s in socks if s.get(zmq.EVENTS) & zmq.POLLIN]
            if not ready and timeout_s > 0 and socks:
                poller = zmq.Poller()
                for _, s in socks:
                    poller.register(s, zmq.POLLIN)
                hit = dict(poller.poll(max(1, int(timeout_s * 1e3))))
                ready = [(l, s) for l, s in socks if s in hit]
            got = []
            for link, s in ready:
                for _ in range(256):
                    try:
                        got.append((link, P.recv_frames(s, _SMALL, zmq.NOBLOCK)))
                    except zmq.Again:
                        break
                    if not s.get(zmq.EVENTS) & zmq.POLLIN:
                        break
        if not socks and timeout_s > 0:
            time.sleep(min(timeout_s, 0.05))
        now = time.monotonic()
        for link in {l for l, _ in got}:
            link.last_heard = now
            link.liveness.heartbeat(now)
            link.suspect_since = None
            link.backoff = self.config.reconnect_initial_s
        for link, frames in got:
            self._accept_from(link, frames)

    def _accept_from(self, link: _Link, frames: list) -> None:
        c = W.parse(frames[0]) if frames else None
        if c is None:
            return
        cmd = c[0]
        if cmd == W.REQUEST and len(c) >= 5 and len(frames) >= 2 and isinstance(c[1], bytes):
            key = link.prefix + c[1]
            if admit_request(self._tail, self.config, link.clock, self._stop_at, [c[0], key, *c[2:]], frames[1:],
                             received_local=True, trace=self._trace):
                link.held.add(key)
        elif cmd == W.HEARTBEAT:
            if len(c) >= 2 and isinstance(c[1], float):
                link.clock.observe(c[1], time.monotonic())
        elif cmd == W.STOP:
            # that broker is going away; the others are still served (it is reconnected later)
            self._send_to(link, [W.ctl(W.BYE)])
            time.sleep(0.02)  # let libzmq flush the goodbye
            self._close_link(link, "stopped", time.monotonic())
        elif cmd == W.RECONNECT:
            self._send_to(link, [W.ctl(W.READY, self.link_status(link, self.grants()[link.index], full=True))])
        elif cmd == W.LOAD and len(c) >= 2 and isinstance(c[1], str):
            self._tail.add_load(c[1], W.stage_of(c))
        elif cmd == W.BUNDLE:
            self._fetcher.on_message(c, frames[1:])

    def _fetch_sender(self, job):
        link = self.links[job.rkey[0]] if job.rkey and job.rkey[0] < len(self.links) else self.links[0]
        return lambda frames: self._send_to(link, frames)

    def accept(self, frames: list) -> None:
        self._accept_from(self.links[0], frames)

    def _open_sockets(self) -> None:
        for link in self.links:
            self._open_link(link)

    def _close_sockets(self) -> None:
        with self._lock:
            for link in self.links:
                if link.sock is not None:
                    link.sock.close(0)
                    link.sock = None

    def _serve_loop(self) -> None:
        cfg = self.config
        while True:
            now = time.monotonic()
            if not self._keep_serving(now):
                return
            for link in self.links:
                if link.sock is None:
                    if self._stop_at is None and now >= link.reopen_at:
                        self._open_link(link)
                    continue
                if self._stop_at is not None or not link.liveness.suspect(now):
                    link.suspect_since = None
                    continue
                # A suspect broker gets one more interval (its messages may still be on their way
                # after our own long batch), then its link is closed and reopened with backoff.
                if link.suspect_since is None:
                    link.suspect_since = now
                elif now - link.suspect_since >= cfg.heartbeat_interval_s:
                    self._close_link(link, f"silent ({link.liveness.describe(now)})", now)
            if not self.pending:
                self._receive(min(cfg.heartbeat_interval_s / 2, 0.05))
                continue
            self._receive(0)
            self.step()

    def describe_links(self) -> list[dict[str, Any]]:
        """Each broker link: address, up, requests held, the grant it was last told."""
        return [{"address": l.address, "up": l.sock is not None and l.suspect_since is None,
                 "held": len(l.held), "grant": l.sent_grant} for l in self.links]
