"""The cloud pool: broker, tail workers, dynamic batching, HTTP admin.

    edgesplit serve --repository bundles/ --workers 2      # or: python -m cloud_server ...

`Server` runs a `Broker`, local `TailWorker` processes (or threads) and the `AdminServer`;
every setting lives in `ServerConfig`. cloud_server imports only the public edgesplit API.
"""

from __future__ import annotations

from cloud_server.config import ServerConfig

__all__ = ["ServerConfig", "Broker", "TailWorker", "Server", "AdminServer", "Metrics"]

_LAZY = {
    "Broker": "cloud_server.broker",
    "TailWorker": "cloud_server.worker",
    "Server": "cloud_server.server",
    "AdminServer": "cloud_server.admin",
    "Metrics": "cloud_server.metrics",
}


def __getattr__(name: str):
    # The worker pulls numpy/onnxruntime paths in; `import cloud_server` stays light for the CLI.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cloud_server' has no attribute {name!r}")
