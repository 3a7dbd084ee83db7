"""The cost model: expected latency (and device energy) of running a bundle split at cut k.

    latency(k) = edge segments [0,k) + encode(k) + bytes_up(k)/bandwidth + bytes_down/bandwidth
                 + RTT + cloud queue + cloud segments [k,n) + decode(k)
    latency(n) = edge segments [0,n)                  (all on the device, nothing sent)

    energy(k)  = busy_w x (edge + encode) + idle_w x (the rest of latency(k))
                 + tx_j_per_byte x bytes_up + rx_j_per_byte x bytes_down

Cut 0 ships the model's inputs (all-cloud); cut n runs everything on the device (all-edge).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence


from edgesplit.errors import ConfigError

__all__ = ["DevicePower", "CutCost", "CostModel", "codec_ratio"]


@dataclass(frozen=True)
class DevicePower:
    """An edge device's power profile, for the energy objective.

    Attributes:
        busy_w: watts while the device computes (head segments, encoding).
        idle_w: watts while it waits for the cloud (radio listening, CPU idle).
        tx_j_per_byte: radio energy per byte sent (e.g. ~1e-7 J/B for Wi-Fi, ~1e-6 for LTE).
        rx_j_per_byte: radio energy per byte received.
    """

    busy_w: float
    idle_w: float = 0.0
    tx_j_per_byte: float = 0.0
    rx_j_per_byte: float = 0.0

    def __post_init__(self):
        for name in ("busy_w", "idle_w", "tx_j_per_byte", "rx_j_per_byte"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
                raise ConfigError(f"DevicePower.{name} must be a finite number >= 0, got {v!r}")

    @classmethod
    def from_json(cls, d: dict) -> "DevicePower":
        try:
            return cls(**{k: float(d[k]) for k in ("busy_w", "idle_w", "tx_j_per_byte", "rx_j_per_byte") if k in d})
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"bad device power profile {d!r}: {exc}") from None


@dataclass(frozen=True)
class CutCost:
    """The predicted cost of one request at one cut; times in milliseconds."""

    cut: int
    edge_ms: float
    encode_ms: float
    transfer_ms: float
    rtt_ms: float
    queue_ms: float
    cloud_ms: float
    decode_ms: float
    bytes_up: float
    bytes_down: float
    energy_j: float | None = None

    @property
    def total_ms(self) -> float:
        return (self.edge_ms + self.encode_ms + self.transfer_ms + self.rtt_ms + self.queue_ms
                + self.cloud_ms + self.decode_ms)

    def objective(self, kind: str) -> float:
        if kind == "latency":
            return self.total_ms
        if kind == "energy":
            if self.energy_j is None:
                raise ConfigError("the energy objective needs a DevicePower profile")
            return self.energy_j
        raise ConfigError(f"unknown objective {kind!r} (latency or energy)")


def codec_ratio(spec: str, dtype: str) -> float:
    """Nominal encoded/raw size of a `dtype` tensor under codec `spec` (the codec stage table's own
    figure: fp16 halves a float32, int8 quarters it; compressors count as 1, since they depend on
    the data — a profile with measured codec sizes replaces this guess)."""
    from edgesplit.codecs import nominal_ratio

    return nominal_ratio(spec, dtype)


def _floats(values: Iterable[float] | None, n: int, what: str, default: float = 0.0) -> list[float]:
    if values is None:
        return [default] * n
    out = [float(v) for v in values]
    if len(out) != n:
        raise ConfigError(f"{what}: expected {n} values, got {len(out)}")
    if any(not math.isfinite(v) or v < 0 for v in out):
        raise ConfigError(f"{what}: values must be finite and >= 0, got {out}")
    return out


@dataclass
class CostModel:
    """Predicts per-cut latency and energy for a bundle of n segments.

    Args:
        edge_ms: n per-segment times on the device.
        cloud_ms: n per-segment times on the cloud worker.
        bytes_up: n+1 values: bytes sent for cut k = 0..n (after the codec; [n] is unused).
        bytes_down: bytes of the reply (the model outputs after the reply codec).
        encode_ms: n+1 edge-side encode times per cut (default 0).
        decode_ms: n+1 cloud-side decode times per cut (default 0).
        power: the device's power profile, for energy (None: no energy figures).

    The model learns online: :meth:`observe_edge` / :meth:`observe_cloud` fold measured
    times into a per-side scale factor (EWMA), so a device slower than its profile, or a
    busier cloud, moves the predictions.
    """

    edge_ms: Sequence[float]
    cloud_ms: Sequence[float]
    bytes_up: Sequence[float]
    bytes_down: float = 0.0
    encode_ms: Sequence[float] | None = None
    decode_ms: Sequence[float] | None = None
    power: DevicePower | None = None
    edge_scale: float = 1.0
    cloud_scale: float = 1.0
    scale_alpha: float = 0.2
    _edge_cum: list[float] = field(init=False, repr=False)
    _cloud_cum: list[float] = field(init=False, repr=False)

    def __post_init__(self):
        n = len(self.edge_ms)
        if n < 1:
            raise ConfigError("a cost model needs at least one segment")
        self.edge_ms = _floats(self.edge_ms, n, "edge_ms")
        self.cloud_ms = _floats(self.cloud_ms, n, "cloud_ms")
        self.bytes_up = _floats(self.bytes_up, n + 1, "bytes_up")
        self.encode_ms = _floats(self.encode_ms, n + 1, "encode_ms")
        self.decode_ms = _floats(self.decode_ms, n + 1, "decode_ms")
        if not (math.isfinite(self.bytes_down) and self.bytes_down >= 0):
            raise ConfigError(f"bytes_down must be >= 0, got {self.bytes_down}")
        self._edge_cum = [0.0]
        for t in self.edge_ms:
            self._edge_cum.append(self._edge_cum[-1] + t)
        self._cloud_cum = [0.0]
        for t in reversed(self.cloud_ms):
            self._cloud_cum.append(self._cloud_cum[-1] + t)
        self._cloud_cum.reverse()  # _cloud_cum[k] = sum(cloud_ms[k:])

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_bundle(cls, bundle, edge, cloud, codec: str = "raw", reply_codec: str = "raw",
                    batch: int = 1, power: DevicePower | None = None,
                    cloud_speedup: float = 1.0) -> "CostModel":
        """A model for `bundle` from two profiles.

        Args:
            bundle: an edgesplit.Bundle.
            edge: the device's :class:`~edgesplit.planning.Profile` or its per-segment ms list.
            cloud: the cloud's Profile or per-segment ms list; None (the server did not say)
                means the edge's times divided by `cloud_speedup`.
            codec / reply_codec: what the edge sends with / the cloud replies with. Sizes and
                codec times come from `edge` when it measured this codec, else nominal ratios.
            batch: samples per request.
        """
        from edgesplit.planning.profile import Profile

        n = bundle.num_segments
        edge_prof = edge if isinstance(edge, Profile) else None
        cloud_prof = cloud if isinstance(cloud, Profile) else None
        edge_ms = list(edge_prof.segment_ms if edge_prof else edge)
        if cloud is None:
            if cloud_speedup <= 0:
                raise ConfigError("cloud_speedup must be > 0")
            cloud_ms = [t / cloud_speedup for t in edge_ms]
        else:
            cloud_ms = list(cloud_prof.segment_ms if cloud_prof else cloud)
        for what, ms in (("edge", edge_ms), ("cloud", cloud_ms)):
            if len(ms) != n:
                raise ConfigError(f"the {what} profile has {len(ms)} segments; bundle {bundle.name} has {n}")
        scale_e = batch / edge_prof.batch if edge_prof else 1.0
        scale_c = batch / cloud_prof.batch if cloud_prof else 1.0
        edge_ms = [t * scale_e for t in edge_ms]
        cloud_ms = [t * scale_c for t in cloud_ms]
        measured = edge_prof.codecs.get(codec) if edge_prof else None
        if measured and len(measured.get("bytes", [])) == n + 1:
            f = batch / edge_prof.batch
            bytes_up = [b * f for b in measured["bytes"]]
            encode_ms = [t * f for t in measured["encode_ms"]]
            cm = cloud_prof.codecs.get(codec) if cloud_prof else None
            dec_src = cm if cm and len(cm.get("decode_ms", [])) == n + 1 else measured
            decode_ms = [t * f for t in dec_src["decode_ms"]]
        else:
            bytes_up = []
            for k in range(n + 1):
                c = bundle.cut(k)
                specs = c.specs or ()
                if specs:
                    bytes_up.append(batch * sum(s.bytes_per_sample() * codec_ratio(codec, s.dtype) for s in specs))
                else:
                    bytes_up.append(batch * c.bytes_per_sample * codec_ratio(codec, "float32"))
            encode_ms = decode_ms = None
        out = bundle.cut(n)
        bytes_down = batch * sum(s.bytes_per_sample() * codec_ratio(reply_codec, s.dtype) for s in out.specs)
        return cls(edge_ms, cloud_ms, bytes_up, bytes_down, encode_ms, decode_ms, power)

    def with_power(self, power: DevicePower | None) -> "CostModel":
        return replace(self, power=power)

    # -- prediction -------------------------------------------------------------------------
    @property
    def num_segments(self) -> int:
        return len(self.edge_ms)

    @property
    def cuts(self) -> range:
        """Every cut the model can price: 0 (all cloud) .. n (all edge)."""
        return range(self.num_segments + 1)

    def cost(self, k: int, bandwidth_bps: float, rtt_s: float, queue_s: float = 0.0,
             down_bandwidth_bps: float | None = None) -> CutCost:
        """The predicted cost of cut k on a link of `bandwidth_bps` (up; down defaults to it)."""
        n = self.num_segments
        if not 0 <= k <= n:
            raise ConfigError(f"cut {k} is outside 0..{n}")
        edge = self._edge_cum[k] * self.edge_scale
        if k == n:
            c = CutCost(k, edge, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        else:
            if not bandwidth_bps or bandwidth_bps <= 0:
                transfer = math.inf
            else:
                down = down_bandwidth_bps or bandwidth_bps
                transfer = (self.bytes_up[k] * 8 / bandwidth_bps + self.bytes_down * 8 / down) * 1e3
            c = CutCost(k, edge, self.encode_ms[k], transfer, max(0.0, rtt_s) * 1e3,
                        max(0.0, queue_s) * 1e3, self._cloud_cum[k] * self.cloud_scale,
                        self.decode_ms[k], self.bytes_up[k], self.bytes_down)
        if self.power is not None:
            p = self.power
            busy_s = (c.edge_ms + c.encode_ms) / 1e3
            wait_s = (c.total_ms / 1e3 - busy_s) if k < n else 0.0
            energy = (p.busy_w * busy_s + p.idle_w * wait_s + p.tx_j_per_byte * c.bytes_up
                      + p.rx_j_per_byte * c.bytes_down)
            c = replace(c, energy_j=energy)
        return c

    def latency_ms(self, k: int, bandwidth_bps: float, rtt_s: float, queue_s: float = 0.0) -> float:
        return self.cost(k, bandwidth_bps, rtt_s, queue_s).total_ms

    def costs(self, bandwidth_bps: float, rtt_s: float, queue_s: float = 0.0,
              allowed: Iterable[int] | None = None) -> list[CutCost]:
        """The cost of every allowed cut (default: all of 0..n), in cut order."""
        ks = self.cuts if allowed is None else sorted(set(allowed))
        return [self.cost(k, bandwidth_bps, rtt_s, queue_s) for k in ks]

    def best(self, bandwidth_bps: float, rtt_s: float, queue_s: float = 0.0,
             objective: str = "latency", allowed: Iterable[int] | None = None,
             deadline_ms: float | None = None) -> CutCost:
        """The cheapest cut; ties go to the later cut (less traffic, fewer dependencies).

        With `deadline_ms`, the cheapest of the cuts predicted to answer within it, if any is.
        """
        costs = self.costs(bandwidth_bps, rtt_s, queue_s, allowed)
        if deadline_ms is not None:
            costs = [c for c in costs if c.total_ms <= deadline_ms] or costs
        return min(reversed(costs), key=lambda c: c.objective(objective))

    # -- online correction ------------------------------------------------------------------
    def observe_edge(self, k: int, measured_ms: float) -> None:
        """Fold a measured head time (segments [0,k)) into the edge scale factor."""
        predicted = self._edge_cum[k]
        if predicted > 0 and measured_ms > 0 and math.isfinite(measured_ms):
            a = self.scale_alpha
            self.edge_scale = (1 - a) * self.edge_scale + a * measured_ms / predicted

    def observe_cloud(self, k: int, measured_ms: float) -> None:
        """Fold a measured tail compute time (segments [k,n), the server's compute_ms)."""
        predicted = self._cloud_cum[k]
        if predicted > 0 and measured_ms > 0 and math.isfinite(measured_ms):
            a = self.scale_alpha
            self.cloud_scale = (1 - a) * self.cloud_scale + a * measured_ms / predicted
