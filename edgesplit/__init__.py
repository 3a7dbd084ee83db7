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
    "EdgeAgent", "AgentConfig", "__version__",
]


def __getattr__(name: str):
    # Convenience re-export for SDK users; resolved lazily so the core never imports edge_agent.
    if name in ("EdgeAgent", "AgentConfig", "InferenceResult"):
        import edge_agent

        return getattr(edge_agent, name)
    raise AttributeError(f"module 'edgesplit' has no attribute {name!r}")
