"""The link emulator measured with real sockets: rate, delay, jitter order, cut/restore, traces."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import pytest

from edgesplit.errors import ConfigError
from edgesplit.netsim import (
    LinkEmulator,
    TracePlayer,
    format_rate,
    load_trace,
    parse_duration,
    parse_rate,
    trace_from_rows,
)


# -- real servers ------------------------------------------------------------------------------
class EchoServer:
    """Echoes every byte back, one thread per connection."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def to(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self):
        while not self.stop.is_set():
            try:
                c, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.settimeout(30)
        try:
            while True:
                data = c.recv(65536)
                if not data:
                    break
                c.sendall(data)
        except OSError:
            pass
        finally:
            c.close()

    def close(self):
        self.stop.set()
        self.sock.close()


class SinkServer:
    """Receives one connection to EOF and records when each chunk arrived."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.chunks: list[tuple[float, int]] = []
        self.done = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        self.sock.settimeout(30)
        try:
            c, _ = self.sock.accept()
            c.settimeout(30)
            while True:
                data = c.recv(65536)
                if not data:
                    break
                self.chunks.append((time.monotonic(), len(data)))
            c.close()
        except OSError:
            pass
        finally:
            self.done.set()

    def close(self):
        self.sock.close()


@pytest.fixture
def echo():
    srv = EchoServer()
    yield srv
    srv.close()


def connect(address: str, timeout: float = 5.0) -> socket.socket:
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = s.recv(n - len(buf))
        if not data:
            raise ConnectionError("closed early")
        buf += data
    return bytes(buf)


def ping_ms(s: socket.socket, payload: bytes = b"x" * 64) -> float:
    t0 = time.perf_counter()
    s.sendall(payload)
    recv_exact(s, len(payload))
    return (time.perf_counter() - t0) * 1e3


def median_rtt_ms(address: str, n: int = 15) -> float:
    with connect(address) as s:
        ping_ms(s)  # the first round trip pays for connection set-up upstream
        return statistics.median(ping_ms(s) for _ in range(n))


# -- parsing -----------------------------------------------------------------------------------
def test_parse_rate_and_duration():
    assert parse_rate("10mbit") == 10e6
    assert parse_rate("500kbit") == 500e3
    assert parse_rate("1gbit") == 1e9
    assert parse_rate("1mbps") == 8e6          # tc: bps is bytes per second
    assert parse_rate("2.5e6") == 2.5e6
    assert parse_rate(None) is None and parse_rate("unlimited") is None
    assert parse_duration("20ms") == pytest.approx(0.020)
    assert parse_duration("1.5s") == 1.5
    assert parse_duration("300us") == pytest.approx(300e-6)
    assert parse_duration(0.25) == 0.25
    assert format_rate(10e6) == "10mbit" and format_rate(None) == "unlimited"
    for bad in ("ten mbit", "10 furlongs", "-5mbit", "0"):
        with pytest.raises(ConfigError):
            parse_rate(bad)
    with pytest.raises(ConfigError):
        parse_duration("soon")


def test_bad_addresses_are_config_errors():
    with pytest.raises(ConfigError):
        LinkEmulator(to="127.0.0.1:notaport")
    with pytest.raises(ConfigError):
        LinkEmulator(to="127.0.0.1:0")


# -- accuracy ----------------------------------------------------------------------------------
def measure_rate_bps(link_kw: dict, nbytes: int, direction: str = "up") -> float:
    """Push `nbytes` through the emulator one way; the receiver's first-to-last byte rate."""
    sink = SinkServer()
    if direction == "up":
        with LinkEmulator(to=f"127.0.0.1:{sink.port}", **link_kw) as link:
            with connect(link.address, timeout=30) as s:
                s.sendall(os.urandom(nbytes))
                s.shutdown(socket.SHUT_WR)
                assert sink.done.wait(60)
        chunks = sink.chunks
    else:
        # The server side of the emulator sends: listen on the far side, the client receives.
        payload = os.urandom(nbytes)
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)

        def serve():
            c, _ = srv.accept()
            c.sendall(payload)
            c.close()

        threading.Thread(target=serve, daemon=True).start()
        chunks = []
        with LinkEmulator(to=f"127.0.0.1:{srv.getsockname()[1]}", **link_kw) as link:
            with connect(link.address, timeout=30) as s:
                while True:
                    data = s.recv(65536)
                    if not data:
                        break
                    chunks.append((time.monotonic(), len(data)))
        srv.close()
    sink.close()
    assert sum(n for _, n in chunks) == nbytes
    # Rate over everything after the first chunk: no start-up transient in the figure.
    t_first, n_first = chunks[0]
    return (nbytes - n_first) * 8 / (chunks[-1][0] - t_first)


def test_rate_10mbit_within_5_percent():
    # 2.5 MB at 10 Mbit/s is 2 s: long enough that one late wake-up is well under 1%.
    rate = measure_rate_bps({"rate_bps": "10mbit"}, 2_500_000)
    assert rate == pytest.approx(10e6, rel=0.05), f"measured {rate / 1e6:.3f} Mbit/s"


def test_rate_applies_to_the_down_direction_separately():
    rate = measure_rate_bps({"rate_bps": None, "down_rate_bps": "4mbit"}, 1_000_000, "down")
    assert rate == pytest.approx(4e6, rel=0.05), f"measured {rate / 1e6:.3f} Mbit/s"


def test_delay_20ms_adds_20ms_one_way(echo):
    direct = median_rtt_ms(echo.to)
    with LinkEmulator(to=echo.to, delay_s=0.020) as link:
        through = median_rtt_ms(link.address)
    added_one_way = (through - direct) / 2
    # never early; late only by what a loaded box's scheduler adds (22.2 ms was seen beside 4 CPU
    # hogs). On a quiet box it adds 20.2-20.4 ms (docs/planning.md), a figure for the docs, not a test.
    assert 20.0 - 1.0 <= added_one_way < 20.0 + 75.0, (direct, through)


def test_set_changes_a_running_link(echo):
    with LinkEmulator(to=echo.to, delay_s=0.005) as link:
        with connect(link.address) as s:
            ping_ms(s)
            before = statistics.median(ping_ms(s) for _ in range(7))
            link.set(delay_s="30ms")
            ping_ms(s)
            after = statistics.median(ping_ms(s) for _ in range(7))
    # the emulator never delivers early; late by a scheduler hiccup is a loaded box, not a bug
    # (the precision on a quiet box: test_delay_20ms_adds_20ms_one_way)
    assert 10 - 1 <= before < 10 + 150, before
    assert 60 - 1 <= after < 60 + 150, after
    assert after - before > 30, (before, after)


def test_jitter_varies_delay_but_never_reorders_bytes(echo):
    with LinkEmulator(to=echo.to, delay_s=0.010, jitter_s=0.008, seed=1) as link:
        with connect(link.address) as s:
            rtts = [ping_ms(s) for _ in range(15)]
            # Many small writes in a burst: with jitter larger than their spacing, a
            # reordering link would scramble them.
            msg = b"".join(i.to_bytes(4, "big") for i in range(5000))
            for i in range(0, len(msg), 200):
                s.sendall(msg[i:i + 200])
            got = recv_exact(s, len(msg))
    assert got == msg
    assert max(rtts) - min(rtts) > 3.0, rtts        # the jitter is there
    assert min(rtts) > 20 - 2 * 8 - 1               # and bounded


# -- cut and restore ---------------------------------------------------------------------------
def test_cut_stalls_traffic_and_restore_delivers_it(echo):
    with LinkEmulator(to=echo.to, delay_s=0.005) as link:
        with connect(link.address) as s:
            assert ping_ms(s) < 1000
            link.cut()
            assert not link.is_up
            s.sendall(b"hello")
            s.settimeout(0.4)
            with pytest.raises(socket.timeout):
                s.recv(16)
            # A new connection made while the link is down hangs rather than forwards.
            with connect(link.address) as s2:
                s2.sendall(b"new")
                s2.settimeout(0.3)
                with pytest.raises(socket.timeout):
                    s2.recv(16)
                link.restore()
                s2.settimeout(5)
                assert recv_exact(s2, 3) == b"new"
            s.settimeout(5)
            assert recv_exact(s, 5) == b"hello"       # nothing was lost
            assert ping_ms(s) < 1000


def test_cut_with_reset_drops_connections_and_refuses_new_ones(echo):
    with LinkEmulator(to=echo.to) as link:
        s = connect(link.address)
        ping_ms(s)
        link.cut(reset=True)
        s.settimeout(5)
        with pytest.raises((ConnectionError, OSError)):
            # either a reset on send/recv or EOF (turned into ConnectionError by recv_exact)
            s.sendall(b"x")
            recv_exact(s, 1)
        s.close()
        with pytest.raises((ConnectionError, OSError)):
            # refused at connect (a reset) or right after it: either way no byte gets through
            with connect(link.address) as s2:
                s2.settimeout(5)
                s2.sendall(b"x")
                recv_exact(s2, 1)
        assert link.stats.refused >= 1
        link.restore()
        with connect(link.address) as s3:
            assert ping_ms(s3) < 1000


# -- traces ------------------------------------------------------------------------------------
def test_load_trace_formats(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("# a drop then a cut\ntime_s,rate,delay\n0,10mbit,20ms\n1.5,1mbit,40ms\n3,cut,\n4,10mbit,20ms\n")
    tr = load_trace(p)
    assert [s.time_s for s in tr.steps] == [0, 1.5, 3, 4]
    assert tr.at(2.0).rate_bps == 1e6 and tr.at(2.0).delay_s == pytest.approx(0.04)
    assert tr.at(3.5).up is False and tr.at(0.1).up is True
    p2 = tmp_path / "t2.csv"
    p2.write_text("time_s,rate_mbit,delay_ms\n0,30,5\n2,0,5\n")
    tr2 = load_trace(p2)
    assert tr2.steps[0].rate_bps == 30e6 and tr2.steps[1].up is False
    bad = tmp_path / "bad.csv"
    bad.write_text("time_s,rate\n0,fast\n")
    with pytest.raises(ConfigError, match="bad.csv:2"):
        load_trace(bad)


def test_trace_player_changes_the_link_on_time(echo):
    trace = trace_from_rows([(0, "20mbit", 0.001), (0.3, "2mbit", 0.015), (0.6, 0, None),
                             (0.9, "20mbit", 0.001)])
    with LinkEmulator(to=echo.to) as link:
        with TracePlayer(link, trace) as player:
            time.sleep(0.15)
            assert link.settings["up_rate_bps"] == 20e6 and link.is_up
            time.sleep(0.3)
            assert link.settings["up_rate_bps"] == 2e6
            assert link.settings["delay_s"] == pytest.approx(0.015)
            time.sleep(0.3)
            assert not link.is_up
            time.sleep(0.3)
            assert link.is_up and link.settings["delay_s"] == pytest.approx(0.001)
            assert player.applied and len(player.applied) == 4
            lag = [t - player.started_at - step.time_s for t, step in player.applied]
            assert max(lag) < 0.1, lag


# -- the command line --------------------------------------------------------------------------
def test_cli_forwards_and_takes_commands(echo):
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgesplit", "netsim", "--listen", "127.0.0.1:0", "--to", echo.to,
         "--delay", "10ms", "--rate", "50mbit"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("netsim: tcp://127.0.0.1:"), line + proc.stderr.read()
        address = line.split()[1]
        assert "delay=10ms" in line and "up_rate=50mbit" in line
        first = median_rtt_ms(address, n=5)
        assert 20 - 1 <= first < 20 + 150, first  # never early; late only on a loaded box
        proc.stdin.write("set delay=25ms\n")
        proc.stdin.flush()
        assert "delay=25ms" in proc.stdout.readline()
        second = median_rtt_ms(address, n=5)
        assert 50 - 1 <= second < 50 + 150 and second - first > 15, (first, second)
        proc.stdin.write("cut\n")
        proc.stdin.flush()
        assert proc.stdout.readline().startswith("netsim: CUT")
        proc.stdin.write("quit\n")
        proc.stdin.flush()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
