"""A user-space TCP link emulator: rate limit, one-way delay, jitter, cut and restore.

The kernel of the boxes we test on has no netem, so tests and benchmarks put this forwarder
between an edge agent and a cloud server instead::

    with LinkEmulator(to="127.0.0.1:5555", rate_bps=10e6, delay_s=0.020) as link:
        agent = EdgeAgent(link.address, ...)      # tcp://127.0.0.1:<port>
        link.set(rate_bps=1e6)                    # the link slows down
        link.cut(); ...; link.restore()           # and goes away for a while

The model of one direction of the link, shared by every connection through it:

* **Rate** (token bucket): a segment of ``n`` bytes leaves when the bucket holds ``n`` bytes;
  the bucket fills at ``rate_bps / 8`` bytes/s up to ``burst_bytes``. The reader keeps at most
  10 ms of line time queued ahead of the wire, so a slow link pushes back on the sender's TCP
  window as a real bottleneck does.
* **Delay and jitter**: a segment arrives ``delay_s + U(-jitter_s, +jitter_s)`` after it left,
  but never before the segment sent before it on the same connection: a TCP byte stream is
  never reordered, jitter only bunches segments up.
* **Cut** (blackhole): nothing is read or delivered; bytes already in flight wait and arrive
  ``delay_s`` after :meth:`LinkEmulator.restore` (TCP would have retransmitted them), and new
  connections are accepted but hang until the restore. ``cut(reset=True)`` instead resets every
  connection and refuses new ones (accept + RST) until the restore.

A :class:`Trace` replays rate/delay/cut over time from a CSV file (see :func:`load_trace`).

Threads, not asyncio: ``time.sleep``/``Event.wait`` wake within ~0.1 ms on Linux, where the
asyncio loop rounds its epoll timeout up to whole milliseconds.
"""

from __future__ import annotations

import csv
import logging
import random
import re
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from edgesplit.errors import ConfigError

__all__ = [
    "LinkEmulator",
    "LinkStats",
    "Trace",
    "TraceStep",
    "TracePlayer",
    "load_trace",
    "parse_rate",
    "parse_duration",
    "format_rate",
]

log = logging.getLogger(__name__)

_UNSET = object()

# tc(8) units: "bit" suffixes are bits per second, "bps" suffixes are BYTES per second.
_RATE_UNITS = {
    "": 1.0, "bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9,
    "bps": 8.0, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9,
}
_TIME_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "ms": 1e-3, "msec": 1e-3, "us": 1e-6, "usec": 1e-6}


def parse_rate(text: str | float | int | None) -> float | None:
    """Bits per second from ``"10mbit"``, ``"500kbit"``, ``"1.5e6"`` (tc units; ``kbps`` = kB/s).

    ``None``, ``""``, ``"inf"`` and ``"unlimited"`` mean no limit (returns None).
    """
    if text is None:
        return None
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        s = text.strip().lower()
        if s in ("", "inf", "none", "unlimited"):
            return None
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)", s)
        if not m or m.group(2) not in _RATE_UNITS:
            raise ConfigError(f"bad rate {text!r}: use e.g. 10mbit, 500kbit, 1gbit (tc units)")
        value = float(m.group(1)) * _RATE_UNITS[m.group(2)]
    if value <= 0:
        raise ConfigError(f"rate must be positive, got {text!r} (use cut() for a dead link)")
    return value


def parse_duration(text: str | float | int) -> float:
    """Seconds from ``"20ms"``, ``"1.5s"``, ``"300us"``; a bare number is seconds."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        s = text.strip().lower()
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)", s)
        if not m or m.group(2) not in _TIME_UNITS:
            raise ConfigError(f"bad duration {text!r}: use e.g. 20ms, 1.5s, 300us")
        value = float(m.group(1)) * _TIME_UNITS[m.group(2)]
    if value < 0:
        raise ConfigError(f"duration must not be negative, got {text!r}")
    return value


def format_rate(bps: float | None) -> str:
    """``10000000.0`` -> ``"10mbit"``; None -> ``"unlimited"``."""
    if bps is None:
        return "unlimited"
    for unit, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if bps >= scale:
            return f"{bps / scale:g}{unit}"
    return f"{bps:g}bit"


def _split_hostport(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    s = text.strip()
    if s.startswith("tcp://"):
        s = s[len("tcp://"):]
    if s.startswith("["):  # [::1]:5555
        host, _, port = s[1:].partition("]:")
    elif ":" in s:
        host, _, port = s.rpartition(":")
    else:
        host, port = "", s
    host = host or default_host
    if host == "*":
        host = "0.0.0.0"
    try:
        return host, int(port)
    except ValueError:
        raise ConfigError(f"bad address {text!r}: expected HOST:PORT") from None


@dataclass
class LinkStats:
    """Counters of one emulator since it started."""

    connections: int = 0          # connections accepted
    active: int = 0               # connections open now
    bytes_up: int = 0             # client -> server bytes delivered
    bytes_down: int = 0           # server -> client bytes delivered
    refused: int = 0              # connections reset because the link was cut with reset=True


class _Direction:
    """One direction of the link: its settings and its token bucket, shared by all connections."""

    def __init__(self, rate_bps: float | None, burst_bytes: int | None):
        self.rate_bps = rate_bps
        self._burst_bytes = burst_bytes
        self._next_free = 0.0   # virtual time at which the bucket next holds enough tokens
        self._lock = threading.Lock()

    def segment_bytes(self) -> int:
        # ~2 ms of line time per segment: fine-grained enough that small messages are not
        # held behind big ones for long, coarse enough that 100 Mbit/s is few wake-ups.
        if self.rate_bps is None:
            return 256 * 1024
        return int(min(256 * 1024, max(1460, self.rate_bps / 8 * 0.002)))

    def burst(self) -> float:
        if self._burst_bytes is not None:
            return float(self._burst_bytes)
        return float(self.segment_bytes())

    def reserve(self, nbytes: int, now: float) -> float:
        """Take `nbytes` from the bucket; return when they have left (>= now)."""
        rate = self.rate_bps
        if rate is None:
            return now
        with self._lock:
            bytes_per_s = rate / 8.0
            # A bucket holding at most `burst` bytes: unused time older than that is forgotten.
            start = max(self._next_free, now - self.burst() / bytes_per_s)
            done = start + nbytes / bytes_per_s
            self._next_free = done
        return max(done, now)

    def after_outage(self, now: float) -> None:
        with self._lock:
            self._next_free = max(self._next_free, now)


class _Pipe:
    """One direction of one connection: a reader thread and a delivering writer thread."""

    def __init__(self, link: "LinkEmulator", conn: "_Connection", src: socket.socket,
                 dst: socket.socket, direction: _Direction, name: str):
        self.link, self.conn, self.src, self.dst = link, conn, src, dst
        self.direction, self.name = direction, name
        self._queue: deque = deque()           # (arrival time, bytes | None for EOF)
        self._cv = threading.Condition()
        self._last_arrival = 0.0
        self._queued = 0                       # bytes read but not yet delivered
        self.reader = threading.Thread(target=self._read, name=f"netsim-{name}-rd", daemon=True)
        self.writer = threading.Thread(target=self._write, name=f"netsim-{name}-wr", daemon=True)

    def start(self) -> None:
        self.reader.start()
        self.writer.start()

    # Bytes one direction of one connection may hold in flight: more than a bandwidth-delay
    # product of 1 Gbit/s x 60 ms, so only an unlimited rate into a slow receiver reaches it.
    MAX_QUEUED = 8 * 1024 * 1024
    # Line time the reader may run ahead of the emulated wire (the bottleneck's queue).
    QUEUE_S = 0.010

    def _push(self, arrival: float, data: bytes | None) -> None:
        with self._cv:
            self._queue.append((arrival, data))
            if data is not None:
                self._queued += len(data)
            self._cv.notify_all()
            while self._queued > self.MAX_QUEUED and not self.conn.dead \
                    and not self.link._closed.is_set():
                self._cv.wait(0.5)

    def _read(self) -> None:
        link = self.link
        try:
            while not link._closed.is_set() and not self.conn.dead:
                if not link._wait_up():
                    break
                n = self.direction.segment_bytes()
                data = self.src.recv(n)
                if not data:
                    self._push(0.0, None)
                    return
                now = time.monotonic()
                if not link._up.is_set():     # cut while we were blocked in recv
                    if not link._wait_up():
                        break
                    now = time.monotonic()
                left = self.direction.reserve(len(data), now)
                delay, jitter = link._delay_s, link._jitter_s
                one_way = delay + (link._rng.uniform(-jitter, jitter) if jitter > 0 else 0.0)
                arrival = max(left + max(0.0, one_way), self._last_arrival)
                self._last_arrival = arrival
                self._push(arrival, data)
                # Keep at most QUEUE_S of line time read ahead of the wire: the sender feels the
                # bottleneck through its TCP window, and a late wake-up of this thread does not
                # leave the emulated line idle.
                link._sleep_until(left - self.QUEUE_S)
        except OSError:
            pass
        self._push(0.0, None)

    def _write(self) -> None:
        link = self.link
        try:
            while True:
                with self._cv:
                    while not self._queue and not self.conn.dead and not link._closed.is_set():
                        self._cv.wait(0.5)
                    if self.conn.dead or link._closed.is_set():
                        return
                    arrival, data = self._queue.popleft()
                    if data is not None:
                        self._queued -= len(data)
                        self._cv.notify_all()
                if data is None:
                    try:
                        self.dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                link._sleep_until(arrival)
                if not link._up.is_set():
                    # Bytes in flight when the link died: delivered a delay after it comes back.
                    if not link._wait_up():
                        return
                    link._sleep_until(time.monotonic() + link._delay_s)
                    self._last_arrival = max(self._last_arrival, time.monotonic())
                if self.conn.dead:
                    return
                self.dst.sendall(data)
                link._count(self.name, len(data))
        except OSError:
            pass
        finally:
            self.conn.pipe_done()


class _Connection:
    def __init__(self, link: "LinkEmulator", client: socket.socket, peer):
        self.link, self.client, self.peer = link, client, peer
        self.server: socket.socket | None = None
        self.dead = False
        self._pending = 2
        self._lock = threading.Lock()

    def start(self) -> None:
        threading.Thread(target=self._open, name="netsim-open", daemon=True).start()

    def _open(self) -> None:
        link = self.link
        # A connection made while the link is cut hangs until it is restored.
        if not link._wait_up():
            self.abort()
            return
        try:
            self.server = socket.create_connection(link._to, timeout=10.0)
            self.server.settimeout(None)
        except OSError as exc:
            log.info("netsim: cannot reach %s:%d: %s", *link._to, exc)
            self.abort()
            return
        for s in (self.client, self.server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up = _Pipe(link, self, self.client, self.server, link._up_dir, "up")
        down = _Pipe(link, self, self.server, self.client, link._down_dir, "down")
        up.start()
        down.start()

    def pipe_done(self) -> None:
        with self._lock:
            self._pending -= 1
            last = self._pending == 0
        if last:
            self.close()

    def abort(self) -> None:
        """Reset both sides (RST, not FIN)."""
        self.dead = True
        for s in (self.client, self.server):
            if s is None:
                continue
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            except OSError:
                pass
        self.close()

    def close(self) -> None:
        self.dead = True
        for s in (self.client, self.server):
            if s is None:
                continue
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass
        self.link._forget(self)


class LinkEmulator:
    """A TCP forwarder from `listen` to `to` that behaves like a slow, late, flaky link.

    Args:
        listen: ``"HOST:PORT"`` to accept on; port 0 picks a free one (see :attr:`address`).
        to: ``"HOST:PORT"`` (or ``"tcp://HOST:PORT"``) of the real server.
        rate_bps: bits per second in each direction; None = unlimited.
        delay_s: one-way delay added in each direction (a round trip gains twice this).
        jitter_s: each segment's delay varies uniformly within +-jitter_s (never reordered).
        up_rate_bps / down_rate_bps: override `rate_bps` for client->server / server->client.
        burst_bytes: token-bucket depth; default about 2 ms of line time.
        seed: for the jitter's random numbers.
    """

    def __init__(self, listen: str = "127.0.0.1:0", to: str = "127.0.0.1:0",
                 rate_bps: float | None = None, delay_s: float = 0.0, jitter_s: float = 0.0, *,
                 up_rate_bps: float | None | object = _UNSET,
                 down_rate_bps: float | None | object = _UNSET,
                 burst_bytes: int | None = None, seed: int | None = None):
        self._listen = _split_hostport(listen)
        self._to = _split_hostport(to)
        if self._to[1] <= 0:
            raise ConfigError(f"LinkEmulator needs a destination port, got to={to!r}")
        self._up_dir = _Direction(None, burst_bytes)
        self._down_dir = _Direction(None, burst_bytes)
        self._delay_s = 0.0
        self._jitter_s = 0.0
        self._rng = random.Random(seed)
        self._up = threading.Event()
        self._up.set()
        self._reset_mode = False
        self._closed = threading.Event()
        self._conns: set[_Connection] = set()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.stats = LinkStats()
        self.set(rate_bps=rate_bps, delay_s=delay_s, jitter_s=jitter_s,
                 up_rate_bps=up_rate_bps, down_rate_bps=down_rate_bps)

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> "LinkEmulator":
        """Bind and start forwarding in a background thread; returns self."""
        if self._sock is not None:
            return self
        sock = socket.socket(socket.AF_INET6 if ":" in self._listen[0] else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(self._listen)
        except OSError as exc:
            sock.close()
            raise ConfigError(f"netsim cannot listen on {self._listen[0]}:{self._listen[1]}: {exc}") from exc
        sock.listen(128)
        sock.settimeout(0.2)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="netsim-accept", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop accepting, close every connection and join the accept thread."""
        self._closed.set()
        self._up.set()  # wake every waiter so it can see `_closed`
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.close()
        if self._thread is not None:
            self._thread.join(timeout=2.0)

    def __enter__(self) -> "LinkEmulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def port(self) -> int:
        if self._sock is None:
            raise RuntimeError("LinkEmulator is not started")
        return self._sock.getsockname()[1]

    @property
    def host(self) -> str:
        host = self._listen[0]
        return "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)

    @property
    def address(self) -> str:
        """``tcp://HOST:PORT`` to connect to (ZeroMQ endpoint form)."""
        host = self.host
        return f"tcp://[{host}]:{self.port}" if ":" in host else f"tcp://{host}:{self.port}"

    # -- control ----------------------------------------------------------------------------
    def set(self, rate_bps=_UNSET, delay_s=_UNSET, jitter_s=_UNSET, *,
            up_rate_bps=_UNSET, down_rate_bps=_UNSET) -> None:
        """Change the link; arguments left out keep their value. Rates accept "10mbit" too."""
        if rate_bps is not _UNSET:
            r = parse_rate(rate_bps)
            self._up_dir.rate_bps = r
            self._down_dir.rate_bps = r
        if up_rate_bps is not _UNSET:
            self._up_dir.rate_bps = parse_rate(up_rate_bps)
        if down_rate_bps is not _UNSET:
            self._down_dir.rate_bps = parse_rate(down_rate_bps)
        if delay_s is not _UNSET:
            self._delay_s = parse_duration(delay_s)
        if jitter_s is not _UNSET:
            self._jitter_s = parse_duration(jitter_s)

    @property
    def settings(self) -> dict:
        """The current link: rates (bit/s or None), delay and jitter (s), and whether it is up."""
        return {"up_rate_bps": self._up_dir.rate_bps, "down_rate_bps": self._down_dir.rate_bps,
                "delay_s": self._delay_s, "jitter_s": self._jitter_s, "up": self.is_up}

    @property
    def is_up(self) -> bool:
        return self._up.is_set()

    def cut(self, reset: bool = False) -> None:
        """Take the link down.

        Args:
            reset: False (blackhole): traffic stalls and new connections hang until
                :meth:`restore`. True: every connection is reset now and new ones are reset
                on accept until :meth:`restore`.
        """
        self._reset_mode = reset
        self._up.clear()
        if reset:
            with self._lock:
                conns = list(self._conns)
            for c in conns:
                c.abort()

    def restore(self) -> None:
        """Bring the link back up; stalled traffic resumes (delay_s later)."""
        now = time.monotonic()
        self._up_dir.after_outage(now)
        self._down_dir.after_outage(now)
        self._reset_mode = False
        self._up.set()

    # -- internals --------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._closed.is_set():
            try:
                client, peer = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            client.settimeout(None)
            if not self._up.is_set() and self._reset_mode:
                self.stats.refused += 1
                try:
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                      b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    client.close()
                except OSError:
                    pass
                continue
            conn = _Connection(self, client, peer)
            with self._lock:
                self._conns.add(conn)
                self.stats.connections += 1
                self.stats.active = len(self._conns)
            conn.start()

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._conns.discard(conn)
            self.stats.active = len(self._conns)

    def _count(self, name: str, n: int) -> None:
        if name == "up":
            self.stats.bytes_up += n
        else:
            self.stats.bytes_down += n

    def _wait_up(self) -> bool:
        """Block while the link is cut; False when the emulator closes meanwhile."""
        while not self._up.wait(0.5):
            if self._closed.is_set():
                return False
        return not self._closed.is_set()

    def _sleep_until(self, t: float) -> None:
        dt = t - time.monotonic()
        if dt > 0:
            self._closed.wait(dt)


# -- traces -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TraceStep:
    """From `time_s` on (since the trace started), the link has these settings.

    ``rate_bps`` None = unlimited; ``up`` False = cut. ``delay_s``/``jitter_s`` None = unchanged.
    """

    time_s: float
    rate_bps: float | None
    delay_s: float | None = None
    jitter_s: float | None = None
    up: bool = True


@dataclass(frozen=True)
class Trace:
    """Link settings over time; :meth:`at` says what holds at a given moment."""

    steps: tuple[TraceStep, ...]

    def __post_init__(self):
        if not self.steps:
            raise ConfigError("a trace needs at least one step")
        times = [s.time_s for s in self.steps]
        if times != sorted(times):
            raise ConfigError("trace times must not decrease")

    @property
    def duration_s(self) -> float:
        return self.steps[-1].time_s

    def at(self, t: float) -> TraceStep:
        current = self.steps[0]
        for s in self.steps:
            if s.time_s <= t:
                current = s
            else:
                break
        return current


def load_trace(path: str | Path) -> Trace:
    """Read a CSV trace with a header row.

    Columns: ``time_s`` (required), then a rate as ``rate`` (tc units such as ``10mbit``; a
    bare number is bit/s), ``rate_mbit`` or ``rate_bps``; optional ``delay`` (``20ms``; bare
    number = seconds) or ``delay_ms``; optional ``jitter`` or ``jitter_ms``. A rate of ``0``,
    ``cut`` or ``down`` takes the link down for that step. Example::

        time_s,rate,delay
        0,10mbit,20ms
        5,1mbit,40ms
        8,cut,40ms
        9,10mbit,20ms
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read trace {path}: {exc}") from exc
    rows = list(csv.DictReader(line for line in text.splitlines() if line.strip()
                               and not line.lstrip().startswith("#")))
    steps = []
    for i, row in enumerate(rows, start=2):
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
        try:
            if "time_s" not in row:
                raise ConfigError("missing time_s column")
            t = float(row["time_s"])
            up = True
            rate: float | None
            if "rate" in row:
                raw = row["rate"].lower()
                if raw in ("cut", "down", "0", "0bit"):
                    up, rate = False, None
                else:
                    rate = parse_rate(raw)
            elif "rate_mbit" in row:
                v = float(row["rate_mbit"])
                up, rate = (v > 0), (v * 1e6 if v > 0 else None)
            elif "rate_bps" in row:
                v = float(row["rate_bps"])
                up, rate = (v > 0), (v if v > 0 else None)
            else:
                raise ConfigError("missing rate, rate_mbit or rate_bps column")
            delay = None
            if row.get("delay"):
                delay = parse_duration(row["delay"])
            elif row.get("delay_ms"):
                delay = float(row["delay_ms"]) / 1e3
            jitter = None
            if row.get("jitter"):
                jitter = parse_duration(row["jitter"])
            elif row.get("jitter_ms"):
                jitter = float(row["jitter_ms"]) / 1e3
        except (ValueError, ConfigError) as exc:
            raise ConfigError(f"{path}:{i}: {exc}") from None
        steps.append(TraceStep(t, rate, delay, jitter, up))
    return Trace(tuple(steps))


class TracePlayer:
    """Applies a :class:`Trace` to a :class:`LinkEmulator` in a background thread.

    Args:
        link: the emulator to drive.
        trace: the steps; step times count from :meth:`start`.
        loop: start over after the last step (the last step's time is the period).
    """

    def __init__(self, link: LinkEmulator, trace: Trace, loop: bool = False):
        self.link, self.trace, self.loop = link, trace, loop
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started_at: float | None = None
        self.applied: list[tuple[float, TraceStep]] = []   # (monotonic time, step) log

    def start(self) -> "TracePlayer":
        self.started_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="netsim-trace", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)

    def __enter__(self) -> "TracePlayer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def _apply(self, step: TraceStep) -> None:
        kw = {"rate_bps": step.rate_bps} if step.up else {}
        if step.delay_s is not None:
            kw["delay_s"] = step.delay_s
        if step.jitter_s is not None:
            kw["jitter_s"] = step.jitter_s
        self.link.set(**kw)
        if step.up and not self.link.is_up:
            self.link.restore()
        elif not step.up and self.link.is_up:
            self.link.cut()
        self.applied.append((time.monotonic(), step))
        log.info("netsim trace t=%.2fs: rate=%s delay=%s up=%s", step.time_s,
                 format_rate(step.rate_bps), step.delay_s, step.up)

    def _run(self) -> None:
        base = self.started_at or time.monotonic()
        period = self.trace.duration_s
        while not self._stop.is_set():
            for step in self.trace.steps:
                if self._stop.wait(max(0.0, base + step.time_s - time.monotonic())):
                    return
                self._apply(step)
            if not self.loop or period <= 0:
                return
            base += period


def trace_from_rows(rows: Iterable[Sequence]) -> Trace:
    """Build a trace in code: rows of ``(time_s, rate_bps or None, delay_s)``; rate 0 = cut."""
    steps = []
    for row in rows:
        t, rate = float(row[0]), row[1]
        delay = float(row[2]) if len(row) > 2 and row[2] is not None else None
        if rate == 0:
            steps.append(TraceStep(t, None, delay, None, up=False))
        else:
            steps.append(TraceStep(t, parse_rate(rate), delay))
    return Trace(tuple(steps))


__all__.append("trace_from_rows")
