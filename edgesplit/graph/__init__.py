"""ONNX analysis: loading models, candidate cuts, and partitioning into a bundle of segments.

    >>> from edgesplit.graph import candidate_cuts, partition
    >>> cuts = candidate_cuts("model.onnx")
    >>> bundle = partition("model.onnx", [cuts[3].tensors, cuts[7].tensors], "out/bundle")

Nothing here imports onnxruntime; `edgesplit verify` (edgesplit.cli.verify_cmd) runs bundles.
"""

from __future__ import annotations

from edgesplit.graph._cuts import CandidateCut, candidate_cuts
from edgesplit.graph._load import load_model
from edgesplit.graph._partition import partition
from edgesplit.graph._shapes import infer_shapes, parse_shape_option

__all__ = [
    "CandidateCut",
    "candidate_cuts",
    "infer_shapes",
    "load_model",
    "parse_shape_option",
    "partition",
]
