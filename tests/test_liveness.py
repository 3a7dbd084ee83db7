"""edgesplit.liveness: the adaptive failure detector, driven by a synthetic clock."""

from __future__ import annotations

import math
import random

import pytest

from edgesplit.errors import ConfigError
from edgesplit.liveness import FailureDetector, phi_of


def _feed(det: FailureDetector, t: float, gaps) -> float:
    for g in gaps:
        t += g
        det.heartbeat(t)
    return t


def test_phi_grows_with_silence_and_matches_the_normal_tail():
    assert phi_of(0.0, 0.0, 1.0) == pytest.approx(math.log10(2))
    assert phi_of(1.0, 0.0, 1.0) < phi_of(2.0, 0.0, 1.0) < phi_of(5.0, 0.0, 1.0)
    assert phi_of(3.0, 0.0, 1.0) == pytest.approx(-math.log10(0.0013499), rel=1e-3)
    assert math.isfinite(phi_of(1e6, 0.0, 1.0)) and phi_of(1e6, 0.0, 1.0) > 1e10  # past double precision


def test_clockwork_peer_is_suspected_soon_after_a_missed_heartbeat():
    det = FailureDetector(0.1, threshold=8, min_std_s=0.02)
    t = _feed(det, 0.0, [0.1] * 50)
    # 0.1 + z(8)=5.6 * 0.02: about 0.21 s
    assert 0.18 < det.limit_s() < 0.25
    assert not det.suspect(t + 0.15)
    assert det.suspect(t + 0.26)
    assert det.phi(t + 0.26) > 8 > det.phi(t + 0.15)


def test_jittery_peer_gets_a_longer_limit_but_never_past_the_ceiling():
    rng = random.Random(1)
    calm = FailureDetector(0.5, min_std_s=0.02, max_silence_s=5.0)
    busy = FailureDetector(0.5, min_std_s=0.02, max_silence_s=5.0)
    _feed(calm, 0.0, [0.5 + rng.uniform(0, 0.05) for _ in range(100)])
    # a loaded box: heartbeats arrive up to 1.5 s late now and then
    _feed(busy, 0.0, [0.5 + (rng.uniform(0.5, 1.5) if i % 10 == 0 else rng.uniform(0, 0.05)) for i in range(100)])
    assert calm.limit_s() < 0.8
    assert busy.limit_s() > 2.0  # a 2 s pause is no longer taken for death
    wild = FailureDetector(0.5, min_std_s=0.02, max_silence_s=5.0)
    _feed(wild, 0.0, [0.5, 60.0] * 20)
    assert wild.limit_s() == 5.0


def test_floor_holds_whatever_the_history():
    det = FailureDetector(0.05, min_std_s=0.001, min_silence_s=0.3)
    t = _feed(det, 0.0, [0.05] * 100)
    assert det.limit_s() == 0.3
    assert not det.suspect(t + 0.29) and det.suspect(t + 0.31)


def test_busy_traffic_does_not_shrink_the_limit():
    """Replies every millisecond count as life, but the limit stays that of the heartbeats."""
    det = FailureDetector(0.2, min_std_s=0.02)
    t = _feed(det, 0.0, [0.2] * 20)
    before = det.limit_s()
    t = _feed(det, t, [0.001] * 200)
    assert det.limit_s() == pytest.approx(before, rel=0.3)
    assert det.limit_s() >= 0.2
    assert not det.suspect(t + 0.2)


def test_expected_traffic_moves_the_deadline_within_the_ceiling():
    det = FailureDetector(0.1, min_std_s=0.02, max_silence_s=3.0)
    t = _feed(det, 0.0, [0.1] * 20)
    det.expect_traffic(t + 1.0)  # a big request still leaving for a second
    assert not det.suspect(t + 1.0) and det.phi(t + 0.9) == 0.0
    assert det.suspect(t + 1.0 + det.limit_s() + 0.01)
    det.expect_traffic(t + 100.0)  # an absurd estimate: the ceiling still holds
    assert not det.suspect(t + 2.9) and det.suspect(t + 3.01)


def test_reset_forgets_the_history_and_the_expected_traffic():
    det = FailureDetector(0.1, min_std_s=0.02, max_silence_s=10)
    t = _feed(det, 0.0, [0.1, 3.0] * 30)
    det.expect_traffic(t + 5)
    assert det.limit_s() > 2
    det.reset(t)
    assert det.limit_s() < 0.3 and det.suspect(t + 0.3)


def test_a_clock_reading_from_the_past_is_ignored():
    det = FailureDetector(0.1)
    det.heartbeat(5.0)
    det.heartbeat(4.0)
    assert det.last == 5.0


@pytest.mark.parametrize("kw", [dict(interval_s=0), dict(interval_s=1, min_std_s=0), dict(interval_s=1, threshold=0),
                                dict(interval_s=1, window=1), dict(interval_s=1, min_silence_s=2, max_silence_s=1)])
def test_bad_settings_are_refused(kw):
    with pytest.raises(ConfigError):
        FailureDetector(**kw)


def test_stall_guard_withholds_verdicts_right_after_the_observers_own_stall():
    from edgesplit.liveness import StallGuard

    g = StallGuard(tolerance_s=0.1, grace_s=0.05, now=0.0)
    assert g.on_time(0.05) and g.on_time(0.1)
    assert not g.on_time(1.5)  # we slept 1.4 s ourselves
    assert not g.on_time(1.52)
    assert g.on_time(1.56) and g.stalls == 1
