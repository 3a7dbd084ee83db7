"""The exception tree of edgesplit; every error the library raises on purpose is here.

    EdgeSplitError
    ├── UserError                  bad input from a person: the CLI exits 1 with one line
    │   ├── ModelError             not ONNX, truncated, fails the checker, unknown op
    │   ├── CutError               a cut that names no tensor, sits in a subgraph, leaves a side empty
    │   ├── BundleError            missing, corrupt or tampered bundle directory
    │   ├── ConfigError            an invalid setting (AgentConfig, ServerConfig, CLI option)
    │   └── MissingDependencyError an optional extra is not installed (names the extra)
    ├── CodecError                 a payload that cannot be encoded or decoded
    ├── ProtocolError              a wire message that breaks the protocol (never crashes a peer)
    ├── TransportError             the link failed: worth a retry, elsewhere or later
    │   ├── LinkDownError          no live server to send to
    │   └── DeadlineExceeded       the answer did not come in time
    ├── RemoteError                the server answered with an error message (has .code)
    └── BackendError               a runner (ONNX Runtime, TensorRT) failed to build or run

Only TransportError (and RemoteError with a retryable code) is ever retried; programming
errors propagate untouched.
"""

from __future__ import annotations

__all__ = [
    "EdgeSplitError",
    "UserError",
    "ModelError",
    "CutError",
    "BundleError",
    "ConfigError",
    "MissingDependencyError",
    "CodecError",
    "ProtocolError",
    "TransportError",
    "LinkDownError",
    "DeadlineExceeded",
    "RemoteError",
    "BackendError",
]


class EdgeSplitError(Exception):
    """Root of every error edgesplit raises on purpose."""


class UserError(EdgeSplitError):
    """Bad input from a person; the CLI prints the message and exits with code 1."""


class ModelError(UserError):
    """The model file is not a usable ONNX model."""


class CutError(UserError):
    """The requested cut cannot split the model."""


class BundleError(UserError):
    """A bundle directory is missing, incomplete or does not match its id."""


class ConfigError(UserError):
    """A configuration value is out of range or inconsistent."""


class MissingDependencyError(UserError):
    """An optional dependency is needed; the message says which extra installs it."""


class CodecError(EdgeSplitError):
    """An activation codec cannot encode or decode the given data."""


class ProtocolError(EdgeSplitError):
    """A wire message breaks the protocol (size, schema, version, shape or dtype)."""


class TransportError(EdgeSplitError):
    """The link to the cloud failed; the request may be retried or run locally."""


class LinkDownError(TransportError):
    """No live server is reachable."""


class DeadlineExceeded(TransportError):
    """The reply did not arrive before the request's deadline."""


class RemoteError(EdgeSplitError):
    """The server answered with an error message.

    Attributes:
        code: the protocol error code (``"busy"``, ``"unknown_bundle"``, ``"bad_request"``, ...).
        retry_after_ms: the server's hint for ``busy``, else None.
    """

    RETRYABLE = frozenset({"busy", "shutdown", "worker_lost", "internal"})

    def __init__(self, code: str, message: str, retry_after_ms: float | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.retry_after_ms = retry_after_ms

    @property
    def retryable(self) -> bool:
        return self.code in self.RETRYABLE


class SessionLostError(EdgeSplitError):
    """A stateful session's state was lost and cannot be rebuilt (its history was dropped at
    AgentConfig.session_history_bytes): start a new session."""


class BackendError(EdgeSplitError):
    """An inference backend failed to load or run a segment."""
