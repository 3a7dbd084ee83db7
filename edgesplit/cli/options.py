"""Command-line options shared by several sub-commands (the core's and the plugins')."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

__all__ = ["add_shape_option", "shapes_from_args", "add_runner_option", "add_state_option", "state_pairs", "check_output_file"]


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


def add_state_option(p: argparse.ArgumentParser) -> None:
    """--state OUT=IN, shared by inspect and partition."""
    p.add_argument("--state", action="append", default=[], metavar="OUT=IN",
                   help="model output OUT feeds model input IN at the next step (a recurrent state, a KV "
                        "cache); the segment that computes it keeps it, so it never crosses a cut. "
                        "present.* -> past_key_values.* (or past.*) pairs are found without this flag. Repeatable")


def state_pairs(args) -> list[tuple[str, str]]:
    from edgesplit.errors import CutError

    pairs = []
    for text in getattr(args, "state", None) or []:
        out, sep, inp = text.partition("=")
        if not sep or not out.strip() or not inp.strip():
            raise CutError(f"--state {text!r}: write OUTPUT=INPUT (a model output and the input it feeds)")
        pairs.append((out.strip(), inp.strip()))
    return pairs


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
