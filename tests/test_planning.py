"""Planning: the cost model, the link estimator (over a real emulated link), the cut chooser's
hysteresis, and profiling real bundles with ONNX Runtime."""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import threading
import time

import pytest

import builders
from edgesplit.errors import ConfigError
from edgesplit.netsim import LinkEmulator
from edgesplit.planning import (
    ChooserConfig,
    CostModel,
    CutChooser,
    DevicePower,
    LinkEstimator,
    NodeProfile,
    Profile,
    codec_ratio,
    profile_bundle,
    profile_nodes,
)


# -- cost model --------------------------------------------------------------------------------
def three_segment_model(**kw) -> CostModel:
    # A conv-net-like shape: a big input, a fat early activation, a thin late one.
    return CostModel(edge_ms=[10, 20, 30], cloud_ms=[1, 2, 3], bytes_up=[600_000, 800_000, 20_000, 0],
                     bytes_down=4_000, **kw)


def test_cost_matches_the_formula():
    m = three_segment_model(encode_ms=[1, 2, 3, 0], decode_ms=[0.5, 0.6, 0.7, 0])
    c = m.cost(2, bandwidth_bps=8e6, rtt_s=0.010, queue_s=0.004)
    # edge 10+20, encode 3, (20000+4000)*8/8e6 s = 24 ms, rtt 10, queue 4, cloud 3, decode 0.7
    assert c.edge_ms == 30 and c.encode_ms == 3 and c.cloud_ms == 3 and c.decode_ms == 0.7
    assert c.transfer_ms == pytest.approx(24.0)
    assert c.total_ms == pytest.approx(30 + 3 + 24 + 10 + 4 + 3 + 0.7)
    all_edge = m.cost(3, 1e3, 1.0)
    assert all_edge.total_ms == 60 and all_edge.bytes_up == 0
    assert m.cost(0, 0, 0.01).total_ms == float("inf")  # a dead link


def test_best_cut_moves_with_bandwidth():
    m = three_segment_model()
    # Slow link: stay on the device. Fast link: ship the input. In between: the thin cut 2.
    assert m.best(0.5e6, 0.02).cut == 3
    assert m.best(20e6, 0.005).cut == 2
    assert m.best(1e9, 0.001).cut == 0
    # A loaded cloud pushes work back to the device.
    assert m.best(1e9, 0.001, queue_s=0.2).cut == 3


def test_energy_objective_prefers_less_device_work():
    power = DevicePower(busy_w=10.0, idle_w=0.5, tx_j_per_byte=1e-7, rx_j_per_byte=1e-7)
    m = three_segment_model(power=power)
    lat = m.best(20e6, 0.005, objective="latency")
    en = m.best(20e6, 0.005, objective="energy")
    assert lat.cut == 2 and en.cut == 0        # busy 10 W makes local compute expensive
    c = m.cost(0, 20e6, 0.02)
    assert c.energy_j == pytest.approx(0.5 * c.total_ms / 1e3 + 1e-7 * (600_000 + 4_000))
    with pytest.raises(ConfigError):
        three_segment_model().best(1e6, 0.02, objective="energy")
    with pytest.raises(ConfigError):
        DevicePower(busy_w=-1)


def test_online_scale_factors_follow_measurements():
    m = three_segment_model()
    for _ in range(30):
        m.observe_edge(2, 90.0)        # the device is 3x slower than profiled
        m.observe_cloud(2, 3.0)        # the cloud as profiled
    assert m.edge_scale == pytest.approx(3.0, rel=0.01)
    assert m.cloud_scale == pytest.approx(1.0, rel=0.01)
    assert m.cost(3, 1e6, 0.02).total_ms == pytest.approx(180, rel=0.01)


def test_codec_ratio():
    assert codec_ratio("raw", "float32") == 1
    assert codec_ratio("fp16", "float32") == 0.5
    assert codec_ratio("int8", "float32") == 0.25
    assert codec_ratio("int4", "float32") == 0.125
    assert codec_ratio("int8+zstd", "float32") == 0.25
    assert codec_ratio("int8", "int64") == 1      # lossy stages leave integer tensors alone
    assert codec_ratio("fp16", "float16") == 1


def test_bad_cost_inputs_are_config_errors():
    with pytest.raises(ConfigError):
        CostModel(edge_ms=[1, 2], cloud_ms=[1], bytes_up=[1, 2, 3])
    with pytest.raises(ConfigError):
        CostModel(edge_ms=[1], cloud_ms=[1], bytes_up=[1, -2])
    with pytest.raises(ConfigError):
        three_segment_model().cost(7, 1e6, 0.0)


# -- link estimator over a real emulated link -------------------------------------------------
class EchoN:
    """Reads a 4-byte length + payload and answers with 4-byte length + N bytes."""

    def __init__(self, reply_bytes: int = 1000):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.reply = b"r" * reply_bytes
        threading.Thread(target=self._run, daemon=True).start()

    @property
    def to(self):
        return f"127.0.0.1:{self.sock.getsockname()[1]}"

    def _run(self):
        try:
            c, _ = self.sock.accept()
        except OSError:
            return
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                n = int.from_bytes(_recv(c, 4), "big")
                _recv(c, n)
                c.sendall(len(self.reply).to_bytes(4, "big") + self.reply)
        except (OSError, ConnectionError):
            c.close()


def _recv(s, n):
    buf = bytearray()
    while len(buf) < n:
        d = s.recv(n - len(buf))
        if not d:
            raise ConnectionError
        buf += d
    return bytes(buf)


def _exchange(s, nbytes):
    t0 = time.perf_counter()
    s.sendall(nbytes.to_bytes(4, "big") + b"q" * nbytes)
    n = int.from_bytes(_recv(s, 4), "big")
    _recv(s, n)
    return time.perf_counter() - t0, n


def test_link_estimator_measures_an_emulated_link_and_follows_a_drop():
    srv = EchoN(reply_bytes=1000)
    est = LinkEstimator()
    with LinkEmulator(to=srv.to, rate_bps=8e6, delay_s=0.010) as link:
        host, port = link.address.removeprefix("tcp://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(5):                       # pings: small both ways
                dt, _ = _exchange(s, 10)
                est.observe(14, 1004, rtt_s=dt)
            assert est.rtt_s == pytest.approx(0.020, abs=0.004)
            for _ in range(6):
                dt, n = _exchange(s, 100_000)        # 100 ms of transfer at 8 Mbit/s
                est.observe(100_004, n + 4, total_s=dt)
            assert est.bandwidth_bps == pytest.approx(8e6, rel=0.15)
            link.set(rate_bps=2e6)                   # the link drops to a quarter
            for _ in range(2):
                dt, n = _exchange(s, 100_000)
                est.observe(100_004, n + 4, total_s=dt)
            assert est.bandwidth_bps == pytest.approx(2e6, rel=0.15)
    assert est.bandwidth_age_s() < 5


def test_link_estimator_ignores_untimeable_transfers():
    est = LinkEstimator(initial_bandwidth_bps=10e6, initial_rtt_s=0.02)
    est.observe(100, 100, total_s=0.0205)            # tiny: no bandwidth information
    assert est.bandwidth_bps == 10e6
    est.observe(1_000_000, 0, total_s=0.0205)        # 1 MB in no time: at least much faster
    assert est.bandwidth_bps > 10e6


# -- cut chooser -------------------------------------------------------------------------------
def test_chooser_does_not_flap_on_noise_but_follows_a_real_change():
    m = three_segment_model()
    rng = random.Random(7)
    # Where cuts 2 and 3 cost about the same: latency(2) = 30 + 24000*8/bw + 20 + 3.
    # Equal to 60 at bw ~ 27 Mbit/s... use the boundary between cut 3 and cut 2.
    boundary = 24_000 * 8 / ((60 - 30 - 20 - 3) / 1e3)
    chooser = CutChooser(m, initial=3)
    cuts = []
    for _ in range(300):
        bw = boundary * rng.uniform(0.9, 1.1)        # +-10 % noise around the boundary
        cuts.append(chooser.update(bw, 0.020))
    assert chooser.switches <= 2, chooser.history
    # Now the link gets much faster, then collapses: the chooser follows each at once.
    chooser.update(1e9, 0.020)
    assert chooser.cut == 0                           # 49 % better: one update is enough
    chooser.update(0.3e6, 0.020)
    assert chooser.cut == 3                           # a >30 % gain: one update is enough


def test_chooser_needs_patience_for_small_gains():
    m = CostModel(edge_ms=[10, 10], cloud_ms=[1, 1], bytes_up=[1_000_000, 10_000, 0])
    chooser = CutChooser(m, initial=2, config=ChooserConfig(margin=0.05, patience=3, fast_margin=0.5))
    # cut 1 costs 10 + 80000/bw*1e3 + 1 + rtt; at bw=8e6 & rtt=1ms: 10+10+1+1 = 22 > 20 = all-edge
    bw = 80_000 / (16 - 10 - 1 - 1) * 1e3               # cut 1 = 16 ms: 20 % better than 20
    assert chooser.update(bw, 0.001) == 2
    assert chooser.update(bw, 0.001) == 2
    assert chooser.update(bw, 0.001) == 1              # third consecutive observation
    assert chooser.link_down() == 2
    assert chooser.history[-1][1] == 2 and chooser.switches == 2


def test_chooser_respects_allowed_cuts_and_unknown_estimates():
    m = three_segment_model()
    chooser = CutChooser(m, allowed=[0, 3])
    assert chooser.cut in (0, 3)
    first = chooser.cut
    assert chooser.update(None, 0.02) == first
    for _ in range(3):
        chooser.update(20e6, 0.02)   # cut 2 would be best, but is not allowed
    assert chooser.cut in (0, 3)
    with pytest.raises(ConfigError):
        CutChooser(m, allowed=[5])


# -- profiling real bundles ---------------------------------------------------------------------
@pytest.fixture
def chain_bundle(tmp_path):
    from edgesplit.graph import partition

    path = builders.save(builders.chain(width=64, depth=4), tmp_path)
    return partition(path, [["h0"], ["h2"]], tmp_path / "bundle")


def test_profile_bundle_times_every_segment_and_codec(chain_bundle, tmp_path):
    prof = profile_bundle(chain_bundle, runner="ort-cpu", threads=1, warmup=2, repeats=5,
                          codecs=("raw", "int8"), batch=4, progress=False)
    n = chain_bundle.num_segments
    assert n == 3 and len(prof.segment_ms) == n and len(prof.segment_p90_ms) == n
    assert all(0 < m <= p for m, p in zip(prof.segment_ms, prof.segment_p90_ms))
    assert prof.runner == "ort-cpu" and prof.batch == 4 and prof.bundle_id == chain_bundle.id
    raw, int8 = prof.codecs["raw"], prof.codecs["int8"]
    assert raw["bytes"][1] == 4 * 64 * 4                  # h0: batch 4 x 64 floats
    assert int8["bytes"][1] < raw["bytes"][1] / 3
    path = tmp_path / "p.json"
    prof.save(path)
    again = Profile.load(path)
    assert again == prof
    model = CostModel.from_bundle(chain_bundle, again, again.scaled(0.5), codec="int8", batch=4)
    assert model.cloud_ms == pytest.approx([t / 2 for t in prof.segment_ms])
    assert model.bytes_up[1] == int8["bytes"][1]
    # Without a measured codec the nominal ratio is used.
    nominal = CostModel.from_bundle(chain_bundle, prof.segment_ms, None, codec="fp16", batch=1)
    assert nominal.bytes_up[1] == 64 * 2 and nominal.bytes_down == 3 * 4


def test_profile_cli_writes_profiles(chain_bundle, tmp_path):
    out = tmp_path / "edge.json"
    r = subprocess.run([sys.executable, "-m", "edgesplit", "profile", str(chain_bundle.path),
                        "--runner", "ort-cpu", "--threads", "1", "--repeats", "5", "-o", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    prof = Profile.load(out)
    assert len(prof.segment_ms) == 3 and "segment" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "edgesplit", "profile", str(tmp_path / "nope"),
                          "-o", str(out)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr


def test_profile_nodes_covers_the_model(tmp_path):
    model = builders.residual(channels=8)
    path = builders.save(model, tmp_path)
    prof = profile_nodes(path, threads=1, warmup=1, repeats=3, progress=False)
    assert len(prof.node_ms) == len(model.graph.node)
    assert prof.total_ms > 0 and sum(prof.node_ms) == pytest.approx(prof.total_ms, rel=1e-6)
    conv = [t for t, op in zip(prof.node_ms, prof.node_ops) if op == "Conv"]
    assert conv and all(t > 0 for t in conv)
    prof.save(tmp_path / "n.json")
    assert NodeProfile.load(tmp_path / "n.json") == prof
    with pytest.raises(ConfigError, match="per-node"):
        Profile.load(tmp_path / "n.json")
    prof.check_model(model)
    with pytest.raises(ConfigError):
        prof.check_model(builders.chain())
    json.loads((tmp_path / "n.json").read_text())


def test_rtt_is_a_windowed_minimum_so_queued_pings_do_not_inflate_it():
    est = LinkEstimator(rtt_window_s=0.3)
    est.observe(0, 0, rtt_s=0.020)
    est.observe(0, 0, rtt_s=0.450)     # a ping that waited behind a bulk transfer
    assert est.rtt_s == pytest.approx(0.020)
    est.observe(100_000, 0, total_s=0.020 + 0.1)
    assert est.bandwidth_bps == pytest.approx(8e6)
    time.sleep(0.35)                   # the window passes: a longer path shows
    est.observe(0, 0, rtt_s=0.060)
    assert est.rtt_s == pytest.approx(0.060)


def test_chooser_leaves_a_cut_predicted_to_miss_the_deadline_at_once():
    # all-edge takes 60 ms; on a 20 Mbit/s link cut 2 takes ~54 ms: 10 % better, a small gain
    m = three_segment_model()
    cfg = ChooserConfig(margin=0.05, patience=3, fast_margin=0.3)
    slow = CutChooser(m, initial=3, config=cfg)
    assert [slow.update(20e6, 0.005) for _ in range(2)] == [3, 3]  # no deadline: patience first
    quick = CutChooser(m, initial=3, config=cfg)
    assert quick.update(20e6, 0.005, deadline_ms=58) == 2  # all-edge would be late: move now
    # and while no cut can make it, the fastest of the late ones is the target
    assert m.best(20e6, 0.005, deadline_ms=1).cut == m.best(20e6, 0.005).cut
