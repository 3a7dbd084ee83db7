"""The table of runner kinds: one entry per backend, found through the `edgesplit.runners` entry points.

A kind is a name ("ort-cpu", "trt", ...), a rank ("auto" tries the lowest first), a check that its
libraries are installed, and a factory. Adding a backend is one RunnerKind object and one line in
pyproject.toml's ``[project.entry-points."edgesplit.runners"]``; nothing else names the kinds.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Callable

from edgesplit.errors import ConfigError

__all__ = ["RunnerKind", "runner_kinds", "runner_kind", "runner_choices"]


@dataclass(frozen=True)
class RunnerKind:
    """One backend that can run a segment.

    Attributes:
        name: what users type (`--runner NAME`, ``EdgeAgent(runner=NAME)``).
        rank: "auto" tries kinds in increasing rank (fastest first).
        summary: one line for help texts.
        create: ``create(path, intra_op_threads, cache_dir) -> Runner`` (not yet activated).
        installed: True when the libraries the kind needs import (the device is checked on activation).
    """

    name: str
    rank: int
    summary: str
    create: Callable[..., object]
    installed: Callable[[], bool]


@functools.lru_cache(maxsize=1)
def runner_kinds() -> tuple[RunnerKind, ...]:
    """Every registered kind, fastest first."""
    kinds = []
    for ep in entry_points(group="edgesplit.runners"):
        kind = ep.load()
        if not isinstance(kind, RunnerKind) or kind.name != ep.name:
            raise ConfigError(f"entry point edgesplit.runners:{ep.name} is not a RunnerKind named {ep.name!r}")
        kinds.append(kind)
    if not kinds:
        raise ConfigError("no runner kinds are registered: is edgesplit installed (pip install -e .)?")
    return tuple(sorted(kinds, key=lambda k: (k.rank, k.name)))


def runner_kind(name: str) -> RunnerKind:
    """The kind called `name`; a clear error listing the others when there is none."""
    for k in runner_kinds():
        if k.name == name:
            return k
    raise ConfigError(f"unknown runner {name!r}; choose {runner_choices()}")


def runner_choices() -> str:
    """'auto, trt, ort-trt, ...' for help texts and error messages."""
    return ", ".join(["auto"] + [k.name for k in runner_kinds()])
