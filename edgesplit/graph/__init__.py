"""ONNX analysis: loading models, candidate cuts, and partitioning into a bundle of segments.

    >>> from edgesplit.graph import candidate_cuts, partition
    >>> cuts = candidate_cuts("model.onnx")
    >>> bundle = partition("model.onnx", [cuts[3].tensors, cuts[7].tensors], "out/bundle")

Nothing here imports onnxruntime; `edgesplit verify` (edgesplit.cli.verify_cmd) runs bundles.
"""

from __future__ import annotations

from edgesplit.graph._cuts import CandidateCut, candidate_cuts, cuts_from_index, fill_unknown
from edgesplit.graph._index import GraphIndex
from edgesplit.graph._load import file_sha256, has_external_data, load_model, weightless
from edgesplit.graph._partition import partition
from edgesplit.graph._state import StatePlan
from edgesplit.graph._shapes import ShapeInfo, eval_dim, infer_shapes, np_dtype_name, parse_shape_option

__all__ = [
    "CandidateCut",
    "GraphIndex",
    "ShapeInfo",
    "StatePlan",
    "candidate_cuts",
    "cuts_from_index",
    "eval_dim",
    "file_sha256",
    "fill_unknown",
    "has_external_data",
    "np_dtype_name",
    "infer_shapes",
    "load_model",
    "parse_shape_option",
    "partition",
    "weightless",
]
