"""edgesplit: cut an ONNX model into an edge head and a cloud tail, and run it over ZeroMQ."""

from __future__ import annotations

from edgesplit.bundle import Bundle, Cut, Segment, TensorSpec
from edgesplit.errors import (
    BundleError,
    CodecError,
    ConfigError,
    CutError,
    EdgeSplitError,
    ModelError,
    ProtocolError,
    RemoteError,
    TransportError,
    UserError,
)

__version__ = "0.1.0"

__all__ = [
    "Bundle", "Cut", "Segment", "TensorSpec",
    "EdgeSplitError", "UserError", "ModelError", "CutError", "BundleError", "ConfigError",
    "CodecError", "ProtocolError", "TransportError", "RemoteError",
    "__version__",
]

