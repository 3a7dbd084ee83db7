"""The DADS min-cut: exact on small graphs, better than any chain-order cut on a branching model,
and its cuts partition into bundles that compute the same outputs as the model."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import builders
from edgesplit.errors import ConfigError
from edgesplit.planning.mincut import MaxFlow, SplitProblem, choose_cuts, min_cut


def two_branch_model() -> onnx.ModelProto:
    """x -> (pool -> conv) and (pool -> conv) -> add -> pool -> flatten, branches interleaved in
    the file so that every chain-order cut keeps one branch waiting on the big input."""
    rng = np.random.default_rng(0)
    w = lambda name, *s: numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.2, name)
    inits = [w("wa", 32, 3, 3, 3), w("wb", 32, 3, 3, 3)]
    nodes = [
        helper.make_node("MaxPool", ["x"], ["a"], kernel_shape=[8, 8], strides=[8, 8], name="pool_a"),
        helper.make_node("Conv", ["a", "wa"], ["ca"], pads=[1, 1, 1, 1], name="conv_a"),
        helper.make_node("AveragePool", ["x"], ["b"], kernel_shape=[8, 8], strides=[8, 8], name="pool_b"),
        helper.make_node("Conv", ["b", "wb"], ["cb"], pads=[1, 1, 1, 1], name="conv_b"),
        helper.make_node("Add", ["ca", "cb"], ["s"], name="add"),
        helper.make_node("GlobalAveragePool", ["s"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["y"], name="flatten"),
    ]
    graph = helper.make_graph(
        nodes, "two_branch",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 64, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


# Per-node device times (ms) like a slow board's: pools cheap, convs dear; the cloud is 10x faster.
EDGE = {"MaxPool": 0.1, "AveragePool": 0.1, "Conv": 5.0, "Add": 0.05, "GlobalAveragePool": 0.05,
        "Flatten": 0.01}


def synthetic_profiles(model, cloud_speedup=10.0):
    edge = [EDGE.get(n.op_type, 0.5) for n in model.graph.node]
    return edge, [t / cloud_speedup for t in edge]


def all_closed_heads(problem: SplitProblem):
    nodes = problem.nodes
    for r in range(len(nodes) + 1):
        for combo in itertools.combinations(nodes, r):
            if problem.is_closed(combo):
                yield frozenset(combo)


def test_maxflow_on_the_textbook_network():
    # CLRS figure 26.1: the maximum flow is 23.
    g = MaxFlow(6)
    for u, v, c in [(0, 1, 16), (0, 2, 13), (1, 3, 12), (2, 1, 4), (2, 4, 14), (3, 2, 9), (3, 5, 20),
                    (4, 3, 7), (4, 5, 4)]:
        g.add_edge(u, v, c)
    assert g.run(0, 5) == 23
    side = g.source_side(0)
    assert 0 in side and 5 not in side


@pytest.mark.parametrize("bandwidth", [0.3e6, 3e6, 10e6, 100e6, 1e9])
def test_min_cut_is_the_exact_optimum_over_every_closed_head(bandwidth):
    model = two_branch_model()
    edge, cloud = synthetic_profiles(model)
    problem = SplitProblem(model, edge, cloud)
    result = problem.min_cut(bandwidth, rtt_s=0.005)
    brute = min(problem.cost_ms(h, bandwidth, 0.005) for h in all_closed_heads(problem))
    assert result.latency_ms == pytest.approx(brute, rel=1e-9)
    assert problem.is_closed(result.head)


def test_min_cut_finds_a_multi_tensor_cut_no_chain_order_cut_matches(tmp_path):
    from edgesplit.graph import candidate_cuts, partition
    from edgesplit.graph import GraphIndex
    from edgesplit.runtime import SegmentChain

    model = two_branch_model()
    path = builders.save(model, tmp_path)
    edge, cloud = synthetic_profiles(model)
    bw, rtt = 10e6, 0.001
    problem = SplitProblem(path, edge, cloud)
    result = problem.min_cut(bw, rtt)
    assert result.kind == "split" and set(result.tensors) == {"a", "b"}

    # Neurosurgeon's space: every prefix of the topological order (and the partitioner's list).
    chain_best = min(problem.cost_ms(h, bw, rtt) for h in problem.chain_heads())
    index = GraphIndex(model)
    cand_best = min(problem.cost_ms(index.ancestors(c.tensors), bw, rtt)
                    for c in candidate_cuts(model, narrow=False))
    all_edge = problem.cost_ms(set(problem.nodes), bw, rtt)
    all_cloud = problem.cost_ms(set(), bw, rtt)
    assert result.latency_ms < 0.5 * min(chain_best, cand_best, all_edge, all_cloud), (
        result.latency_ms, chain_best, cand_best, all_edge, all_cloud)

    # The cut is a real one: the bundle computes what the model computes.
    bundle = partition(path, [list(result.tensors)], tmp_path / "bundle")
    assert set(bundle.cut(1).tensors) == {"a", "b"}
    feeds = builders.example_inputs(model, batch=2)
    import onnxruntime as ort

    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    with SegmentChain(bundle, 0, 1, runner="ort-cpu") as head, SegmentChain(bundle, 1, 2, runner="ort-cpu") as tail:
        got = tail.run(head.run(feeds))["y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_choose_cuts_spans_the_bandwidth_range_with_nested_cuts(tmp_path):
    from edgesplit.graph import partition

    model = builders.residual(channels=8)
    path = builders.save(model, tmp_path)
    # A slow device and a fast cloud: the split moves from all-edge to all-cloud across the range.
    edge = [0.0 if n.op_type == "Constant" else (4.0 if n.op_type == "Conv" else 0.3) for n in model.graph.node]
    cloud = [t / 20 for t in edge]
    choice = choose_cuts(path, edge, cloud, bandwidths=(0.1e6, 1e9), rtt_s=0.002, points=30)
    kinds = {row[2] for row in choice.table}
    assert "all-edge" in kinds and "all-cloud" in kinds
    for a, b in zip(choice.heads, choice.heads[1:]):
        assert a < b
    # Where the min-cut's head was kept, the chosen set achieves the min-cut latency.
    for bw, ms, kind, idx, best in choice.table:
        assert best >= ms - 1e-9
        if idx is not None or kind != "split":
            assert best == pytest.approx(ms)
    if choice.cuts:
        bundle = partition(path, choice.cuts, tmp_path / "auto")
        assert bundle.num_segments == len(choice.cuts) + 1


def test_min_cut_with_measured_profiles_never_loses_to_the_chain(tmp_path):
    from edgesplit.planning import profile_nodes

    model = two_branch_model()
    path = builders.save(model, tmp_path)
    prof = profile_nodes(path, threads=1, warmup=1, repeats=5, progress=False)
    problem = SplitProblem(path, prof.scaled(8.0), prof)
    for bw in (1e6, 10e6, 100e6):
        r = problem.min_cut(bw, 0.01)
        chain = min(problem.cost_ms(h, bw, 0.01) for h in problem.chain_heads())
        assert r.latency_ms <= chain + 1e-9
        assert problem.is_closed(r.head)


def test_min_cut_rejects_mismatched_profiles():
    model = two_branch_model()
    with pytest.raises(ConfigError):
        min_cut(model, [1.0] * 3, [1.0] * 7, 1e6)
    with pytest.raises(ConfigError):
        min_cut(model, [1.0] * 7, [1.0] * 7, 0)
