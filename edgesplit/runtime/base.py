"""The Runner life cycle shared by every backend: activate, infer, deactivate."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from edgesplit.errors import BackendError


class Runner:
    """Runs one ONNX segment. Subclasses implement the ``*_impl`` hooks.

    Use as a context manager, or call ``activate()`` / ``deactivate()`` yourself.
    """

    name = "base"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.is_active = False
        self.input_names: tuple[str, ...] = ()
        self.output_names: tuple[str, ...] = ()

    def activate(self) -> "Runner":
        if not self.is_active:
            self.activate_impl()
            self.is_active = True
        return self

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on `feeds` (extra names are ignored) and return every output by name."""
        if not self.is_active:
            raise BackendError(f"{self.name} runner for {self.path.name} is not active")
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise BackendError(f"{self.path.name}: missing input tensor(s) {missing}")
        return self.infer_impl({n: feeds[n] for n in self.input_names})

    def deactivate(self) -> None:
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    # hooks
    def activate_impl(self) -> None:
        raise NotImplementedError

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def deactivate_impl(self) -> None:
        pass
