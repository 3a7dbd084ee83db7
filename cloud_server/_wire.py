"""The broker <-> worker conversation (internal to cloud_server; edges never see it).

Frames after the ROUTER identity: one small msgpack control frame, then (for requests and
replies) the edge's message frames, forwarded as they came::

    worker -> broker   [ctl("ready", info)]                  info: name, device, bundles, ...
                       [ctl("hb", status)]                   status: queued, loaded, profiles, ...
                       [ctl("reply", rkey, stats), *msg]     stats: [outcome, stage ms, batch size]
                                                             outcome "hop": msg is the next hop's infer
                       [ctl("draining")] / [ctl("bye")]
                       [ctl("fetch", bundle, offset)]        a bundle it does not hold (cloud_server.fetch)
    broker -> worker   [ctl("req", rkey, deadline, received, now[, traceparent[, stop]]), *msg]
                                                             (broker monotonic seconds; stop: a
                                                             pipeline hop runs [msg.cut, stop) only)
                       [ctl("hb", now)] / [ctl("stop")] / [ctl("reconnect")]
                       [ctl("load", bundle[, [start, stop]])]   load it (only that stage)
                       [ctl("bundle", bundle, offset, info), *data]   the index, or a chunk of it

with ctl(cmd, *fields) = msgpack ["ESW1", cmd, *fields]. `rkey` is the broker's key of one
dispatch; a reply whose key the broker no longer holds (the request was re-dispatched or timed
out) is dropped, which is what makes replies exactly-once. One control frame (not one frame
per field) because every frame of a multipart message is a separate send call. Tensors are
never copied.
"""

from __future__ import annotations

from typing import Any

import msgpack

MAGIC = "ESW1"
READY = "ready"
HEARTBEAT = "hb"
REPLY = "reply"
DRAINING = "draining"
BYE = "bye"
REQUEST = "req"
STOP = "stop"
RECONNECT = "reconnect"
LOAD = "load"
FETCH = "fetch"
BUNDLE = "bundle"

# Internal frames are small; anything larger is a bug or an impostor.
MAX_CONTROL_BYTES = 1 << 20


class ClockMap:
    """Maps the broker's monotonic clock onto this process's, from the stamps the broker sends.

    Each stamp gives offset - delay (delay: time on the wire and in socket buffers), so the
    largest recent sample is the best estimate; it is never ahead of the truth, so a deadline
    mapped with it is late by at most the smallest one-way delay. Samples age out (clock drift).
    """

    WINDOW_S = 30.0

    def __init__(self):
        self.offset: float | None = None
        self._cur: float | None = None
        self._prev: float | None = None
        self._since = 0.0

    def observe(self, broker_now: float, local_now: float) -> None:
        sample = broker_now - local_now
        if local_now - self._since > self.WINDOW_S:
            self._prev, self._cur, self._since = self._cur, None, local_now
        self._cur = sample if self._cur is None else max(self._cur, sample)
        self.offset = self._cur if self._prev is None else max(self._cur, self._prev)

    def to_local(self, broker_t: float) -> float:
        return broker_t - (self.offset or 0.0)


def stage_of(c: list) -> tuple[int, int] | None:
    """The [start, stop) of a load order (c: a parsed control frame), or None for the whole bundle."""
    st = c[2] if len(c) > 2 else None
    if type(st) is list and len(st) == 2 and all(type(x) is int and 0 <= x < 1 << 16 for x in st) and st[0] < st[1]:
        return st[0], st[1]
    return None


def ctl(cmd: str, *fields: Any) -> bytes:
    """A control frame."""
    return msgpack.packb([MAGIC, cmd, *fields], use_bin_type=True)


def parse(frame: Any) -> list | None:
    """[cmd, *fields] of a control frame, or None when it is not one."""
    try:
        c = unpack(frame)
    except ValueError:
        return None
    if type(c) is not list or len(c) < 2 or c[0] != MAGIC or type(c[1]) is not str:
        return None
    return c[1:]


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(frame: Any) -> Any:
    """Parse a small control frame; raises ValueError for anything malformed."""
    view = memoryview(frame)
    if view.nbytes > MAX_CONTROL_BYTES:
        raise ValueError("control frame too large")
    try:
        return msgpack.unpackb(view, raw=False, strict_map_key=False, max_ext_len=0)
    except Exception as exc:  # msgpack raises many types
        raise ValueError(f"bad control frame: {exc}") from None
