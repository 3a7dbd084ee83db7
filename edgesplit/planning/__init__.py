"""Choosing the split: profiling, the cost model, link estimation, run-time and partition-time choice.

Profiling (``edgesplit profile``)::

    prof = profile_bundle("bundle/", runner="ort-cpu", threads=1)   # -> Profile
    prof.save("edge.json"); Profile.load("edge.json")
    nodes = profile_nodes("model.onnx", threads=1)                  # -> NodeProfile (for min_cut)

The cost model (times in ms)::

    model = CostModel.from_bundle(bundle, edge=edge_profile, cloud=cloud_profile_or_segment_ms,
                                  codec="int8")
    model.cost(k, bandwidth_bps=10e6, rtt_s=0.02, queue_s=0.0).total_ms
    model.best(10e6, 0.02).cut          # cheapest cut; objective="energy" with a DevicePower

At run time (what EdgeAgent(cut="auto") does)::

    est = LinkEstimator()
    chooser = CutChooser(model)         # hysteresis: ChooserConfig(margin, patience, ...)
    ...after each request:
    est.observe(bytes_sent, bytes_recv, rtt_s=None, total_s=wall_s - server_s)
    model.observe_edge(k, head_ms); model.observe_cloud(k, server_compute_ms)
    k = chooser.update(est.bandwidth_bps, est.rtt_s, queue_s=load["est_wait_ms"] / 1e3)
    ...on a dead link: k = chooser.link_down()

At partition time (``edgesplit partition --auto``), over the whole DAG (DADS)::

    choice = choose_cuts(model_path, edge_nodes, cloud_nodes, bandwidths=(1e6, 100e6), rtt_s=0.02)
    partition(model_path, choice.cuts, "bundle/")   # choice.cuts: tensor-name lists in chain order
    min_cut(model_path, edge_nodes, cloud_nodes, bandwidth_bps=10e6, rtt_s=0.02)  # one link
"""

from __future__ import annotations

from edgesplit.planning.choose import ChooserConfig, CutChooser
from edgesplit.planning.cost import CostModel, CutCost, DevicePower, codec_ratio
from edgesplit.planning.estimate import LinkEstimator
from edgesplit.planning.profile import (
    NodeProfile,
    Profile,
    device_description,
    profile_bundle,
    profile_nodes,
)

__all__ = [
    "Profile", "NodeProfile", "profile_bundle", "profile_nodes", "device_description",
    "CostModel", "CutCost", "DevicePower", "codec_ratio",
    "LinkEstimator",
    "ChooserConfig", "CutChooser",
    "MinCutResult", "min_cut", "choose_cuts",
]


def __getattr__(name: str):
    # The min-cut pulls in onnx graph analysis; load it on first use.
    if name in ("MinCutResult", "min_cut", "choose_cuts"):
        from edgesplit.planning import mincut

        return getattr(mincut, name)
    raise AttributeError(f"module 'edgesplit.planning' has no attribute {name!r}")
