"""Command-line options shared by several sub-commands (the core's and the plugins')."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

__all__ = ["add_shape_option", "shapes_from_args", "add_runner_option", "check_output_file"]


def add_shape_option(p: argparse.ArgumentParser) -> None:
    """The --shape option shared by inspect, partition and verify."""
    p.add_argument("--shape", action="append", default=[], metavar="NAME=DIMS",
                   help="bind symbolic dims: an input (input=1x3x512x512) or a dim symbol (seq=128); "
                        "repeatable. A dynamic batch is 1 unless given")


def shapes_from_args(args) -> dict:
    from edgesplit.graph import parse_shape_option

    shapes: dict = {}
    for text in getattr(args, "shape", None) or []:
        name, dims = parse_shape_option(text)
        shapes[name] = dims
    return shapes


def add_runner_option(p: argparse.ArgumentParser, default: str | None = "auto", what: str = "runner kind",
                      note: str = "") -> None:
    """--runner, its choices read from the runner table (edgesplit.runtime.kinds)."""
    from edgesplit.runtime.kinds import runner_choices

    shown = f"; default {default}" if default else ""
    p.add_argument("--runner", default=default, help=f"{what}: {runner_choices()}{shown}{note}")


def check_output_file(path: str | os.PathLike, what: str = "output") -> Path:
    """Refuse, before any long work, an output file that cannot be written: its directory is
    missing or read-only, or the path is a directory."""
    from edgesplit.errors import ConfigError

    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise ConfigError(f"{what} {p} is a directory, not a file")
    if not parent.is_dir():
        raise ConfigError(f"{what} {p}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ConfigError(f"{what} {p}: not writable")
    return p
