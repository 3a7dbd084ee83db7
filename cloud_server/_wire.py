"""The broker <-> worker conversation (internal to cloud_server; edges never see it).

Frames after the ROUTER identity::

    worker -> broker   [MAGIC, READY, info]                 info: msgpack map (name, device, bundles, ...)
                       [MAGIC, HEARTBEAT, status]           status: msgpack map (queued, loaded, profiles)
                       [MAGIC, REPLY, rkey, stats, *msg]    msg: the edge's reply frames, forwarded as-is
                       [MAGIC, DRAINING] / [MAGIC, BYE]
    broker -> worker   [MAGIC, REQUEST, rkey, ctl, *msg]    msg: the edge's frames, forwarded as-is;
                                                             ctl: msgpack [deadline, received, now]
                                                             (broker monotonic seconds)
                       [MAGIC, HEARTBEAT, now] / [MAGIC, STOP] / [MAGIC, RECONNECT] / [MAGIC, LOAD, bundle]

`rkey` is the broker's key of one dispatch; a reply whose key the broker no longer holds (the
request was re-dispatched or timed out) is dropped, which is what makes replies exactly-once.
Only the small `info`, `status`, `ctl` and `stats` frames are parsed; tensors are never copied.
"""

from __future__ import annotations

from typing import Any

import msgpack

MAGIC = b"ESW1"
READY = b"ready"
HEARTBEAT = b"hb"
REPLY = b"reply"
DRAINING = b"draining"
BYE = b"bye"
REQUEST = b"req"
STOP = b"stop"
RECONNECT = b"reconnect"
LOAD = b"load"

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
