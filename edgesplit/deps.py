"""Optional heavy dependencies, imported on first use: `import edgesplit` needs none of them.

Public: `require(module, purpose)` imports a module or raises MissingDependencyError naming the
extra to install; `available(module)` says whether it imports.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from edgesplit.errors import MissingDependencyError

# module -> the extra that installs it
_EXTRAS = {
    "onnxruntime": "edgesplit (core: pip install onnxruntime)",
    "tensorrt": "edgesplit[trt]",
    "torch": "edgesplit[torch]",
    "aiohttp": "edgesplit[server]",
    "prometheus_client": "edgesplit[server]",
    "PIL": "edgesplit[images]",
    "matplotlib": "edgesplit[plot]",
    "cuda": "edgesplit[trt]",
    "opentelemetry": "edgesplit[otel]",
}


def require(module: str, purpose: str = "") -> ModuleType:
    """Import `module` or raise MissingDependencyError naming what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        extra = _EXTRAS.get(top, top)
        why = f" for {purpose}" if purpose else ""
        raise MissingDependencyError(
            f"{module} is needed{why} but is not installed: pip install '{extra}' ({exc})"
        ) from exc


def available(module: str) -> bool:
    """True when `module` imports."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
