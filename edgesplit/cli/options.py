"""Command-line options shared by several sub-commands (the core's and the plugins')."""

from __future__ import annotations

import argparse

__all__ = ["add_shape_option", "shapes_from_args", "add_runner_option"]


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
