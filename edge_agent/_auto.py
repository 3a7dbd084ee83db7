"""The cut: a fixed one, or cut="auto" — the planning layer's cost model and chooser fed with live estimates.

Every request asks `choose()` for its cut. With a fixed cut that is the answer; with "auto" the
CutChooser re-prices every cut with the LinkEstimator's bandwidth and RTT and the servers'
reported queueing, and moves only on a steady, clear gain (AgentConfig.chooser). The cost model
learns online: the device's head times and the cloud's tail times correct its profile.
"""

from __future__ import annotations

from edgesplit.bundle import Bundle
from edgesplit.planning import CostModel, CutChooser, LinkEstimator

from edge_agent.config import AgentConfig

__all__ = ["AutoCut"]


class AutoCut:
    """The cut of each request, and the estimates that choose it.

    Args:
        bundle: the bundle being split.
        edge_ms: the device profile, ms per segment.
        fixed: the cut the user pinned, or None for "auto".
        codec: the codec spec the cut tensors travel with (prices the transfer).
        config: the agent's settings (chooser, EWMA, reply codec, cloud speed prior).
    """

    def __init__(self, bundle: Bundle, edge_ms: list[float], fixed: int | None, codec: str, config: AgentConfig):
        self.bundle = bundle
        self.edge_ms = edge_ms
        self.fixed = fixed
        self.codec = codec
        self.config = config
        self.link = LinkEstimator(alpha=config.ewma_alpha, min_transfer_s=config.min_transfer_ms / 1e3)
        self.cost = CostModel.from_bundle(bundle, edge_ms, None, codec=codec, reply_codec=config.reply_codec,
                                          cloud_speedup=config.cloud_speedup)
        self.chooser = CutChooser(self.cost, config=config.chooser)
        self._all_edge_count = 0

    @property
    def current(self) -> int:
        """The cut in use now (the fixed one, or the chooser's)."""
        return self.fixed if self.fixed is not None else self.chooser.cut

    def estimates(self, wait_ms: float) -> tuple[float, float, float]:
        """(bandwidth bps, RTT ms, server wait ms); the assumed bandwidth before any traffic."""
        bw = self.link.bandwidth_bps or self.config.chooser.assumed_bandwidth_bps
        rtt = (self.link.rtt_s or 0.0) * 1e3
        return bw, rtt, wait_ms

    def choose(self, cloud_reachable: bool, wait_ms: float) -> int:
        """The cut for the next request."""
        if self.fixed is not None:
            return self.fixed
        n = self.bundle.num_segments
        bw, rtt, wait = self.estimates(wait_ms)
        k = self.chooser.update(bw, rtt / 1e3, wait / 1e3)
        if k == n:
            self._all_edge_count += 1
            if cloud_reachable and self._all_edge_count % self.config.auto_probe_every == 0:
                # everything runs here: send one request to the cloud now and then, so the
                # bandwidth estimate stays fresh and the chooser can see the link got better
                costs = self.cost.costs(bw, rtt / 1e3, wait / 1e3, allowed=range(n))
                k = min(costs, key=lambda c: c.total_ms).cut
        return k

    def predicted_ms(self, batch: int, wait_ms: float) -> dict[int, float]:
        """The cost model's latency per cut 0..n with the current estimates."""
        bw, rtt, wait = self.estimates(wait_ms)
        model = self.cost if batch == 1 else CostModel.from_bundle(
            self.bundle, self.cost.edge_ms, self.cost.cloud_ms, codec=self.codec,
            reply_codec=self.config.reply_codec, batch=batch)
        return {c.cut: c.total_ms for c in model.costs(bw, rtt / 1e3, wait / 1e3)}

    # --- what traffic teaches

    def observe_head(self, k: int, ms_per_sample: float) -> None:
        if self.fixed is None:
            self.cost.observe_edge(k, ms_per_sample)

    def observe_rtt(self, rtt_s: float) -> None:
        self.link.observe(0, 0, rtt_s=rtt_s)

    def observe_exchange(self, k: int, bytes_up: int, bytes_down: int, network_ms: float,
                         compute_ms_per_sample: float) -> None:
        """One answered request: its transfer times the link, the server's compute the tail."""
        self.link.observe(bytes_up, bytes_down, total_s=network_ms / 1e3)
        if self.fixed is None and compute_ms_per_sample > 0:
            self.cost.observe_cloud(k, compute_ms_per_sample)

    def set_cloud_profile(self, segment_ms) -> None:
        """A server told us its per-segment times: price the tail with them from now on."""
        n = self.bundle.num_segments
        if not (isinstance(segment_ms, list) and len(segment_ms) == n
                and all(isinstance(t, (int, float)) and t >= 0 for t in segment_ms)):
            return
        old = self.cost
        model = CostModel.from_bundle(self.bundle, old.edge_ms, [float(t) for t in segment_ms],
                                      codec=self.codec, reply_codec=self.config.reply_codec)
        model.edge_scale = old.edge_scale
        self.cost = self.chooser.model = model
