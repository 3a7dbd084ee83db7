"""`edgesplit partition`: cut a model at one or more cuts and write a bundle directory.

Extending: other ways of choosing cuts (e.g. ``--auto``) add their options in
`add_arguments` and a branch in `cuts_from_args`, which returns the cuts as lists of
tensor names; `run` does the rest.
"""

from __future__ import annotations

import argparse
import sys

from edgesplit.cli.options import add_shape_option, shapes_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="the .onnx file")
    p.add_argument("--cut", action="append", default=[], metavar="T[,T...]",
                   help="tensor names of one cut (the head is everything they depend on; every "
                        "other crossing tensor is added). Repeat for a chain of cuts, in order")
    p.add_argument("-o", "--output", required=True, metavar="BUNDLE", help="the bundle directory to write")
    p.add_argument("--name", default=None, help="the model name in the manifest (default: file stem)")
    add_shape_option(p)
    from edgesplit.cli.plan_cmd import add_auto_arguments  # the planning helper's --auto options

    add_auto_arguments(p)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "partition", help="cut a model into a bundle of segments",
        description="Cut an ONNX model at the given cuts and write a bundle: manifest.json and one "
                    "ONNX file per segment (each weight stored once).")
    add_arguments(p)
    p.set_defaults(func=run)


def cuts_from_args(args) -> list[list[str]]:
    """The cuts to make, each a list of tensor names, from the parsed arguments."""
    from edgesplit.errors import CutError

    if getattr(args, "auto", False):
        from edgesplit.cli.plan_cmd import auto_cuts

        return auto_cuts(args)
    cuts = [[t.strip() for t in c.split(",") if t.strip()] for c in args.cut]
    if not cuts:
        raise CutError("give at least one --cut TENSOR[,TENSOR...] (see `edgesplit inspect MODEL`)")
    return cuts


def run(args) -> int:
    from edgesplit.graph import partition

    cuts = cuts_from_args(args)
    bundle = partition(args.model, cuts, args.output, shapes=shapes_from_args(args) or None, name=args.name)
    print_bundle(bundle)
    return 0


def print_bundle(bundle, out=None) -> None:
    out = out or sys.stdout
    total = 0
    print(f"bundle  {bundle.path}  id {bundle.id[:16]}  ({bundle.num_segments} segments)", file=out)
    for seg in bundle.segments:
        size = sum(f.stat().st_size for f in seg.path.parent.glob(seg.path.name + "*"))
        total += size
        print(f"  segment {seg.index}  {seg.path.relative_to(bundle.path)}  {size / 1e6:8.2f} MB  "
              f"-> {', '.join(seg.outputs[:3])}{' ...' if len(seg.outputs) > 3 else ''}", file=out)
    for cut in bundle.cuts:
        print(f"  cut {cut.index}  {cut.bytes_per_sample:>12,} B/sample  {', '.join(cut.tensors)}", file=out)
    print(f"  segments total {total / 1e6:.2f} MB", file=out)
