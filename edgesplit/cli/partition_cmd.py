"""`edgesplit partition`: cut a model at one or more cuts and write a bundle directory.

Extending: other ways of choosing cuts (e.g. ``--auto``) add their options in
`add_arguments` and a branch in `cuts_from_args`, which returns the cuts as lists of
tensor names; `run` does the rest.
"""

from __future__ import annotations

import argparse
import sys

from edgesplit.cli.options import add_shape_option, add_state_option, shapes_from_args, state_pairs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="the .onnx file")
    p.add_argument("--cut", action="append", default=[], metavar="K|T[,T...]",
                   help="a cut number that `edgesplit inspect` lists (with the same --shape), or the tensor "
                        "names of one cut (the head is everything they depend on; every other crossing "
                        "tensor is added). Repeat for a chain of cuts, in order")
    p.add_argument("-o", "--output", required=True, metavar="BUNDLE", help="the bundle directory to write")
    p.add_argument("--force", action="store_true", help="replace BUNDLE if it exists already")
    add_state_option(p)
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
        raise CutError("give at least one --cut K or --cut TENSOR[,TENSOR...] (see `edgesplit inspect MODEL`)")
    if any(len(c) == 1 and c[0].isdigit() for c in cuts):
        cuts = _numbered_cuts(args, cuts)
    return cuts


def _numbered_cuts(args, cuts: list[list[str]]) -> list[list[str]]:
    """Replace each `--cut K` by the tensors of cut K as `edgesplit inspect` numbers them."""
    from edgesplit.errors import CutError
    from edgesplit.graph import GraphIndex, candidate_cuts, load_model

    model = load_model(args.model, load_weights=False)
    names = set(GraphIndex(model).producer) | {i.name for i in model.graph.input}
    listed = candidate_cuts(model, shapes_from_args(args) or None)
    out = []
    for c in cuts:
        if len(c) == 1 and c[0].isdigit():
            if c[0] in names:
                raise CutError(f"--cut {c[0]} is both a tensor name and a cut number of this model; "
                               f"give the cut's tensors by name")
            k = int(c[0])
            hit = [cut for cut in listed if cut.index == k]
            if not hit:
                raise CutError(f"--cut {k}: `edgesplit inspect` lists cuts "
                               f"{', '.join(str(cut.index) for cut in listed) or 'none'} for {args.model}")
            out.append(list(hit[0].tensors))
        else:
            out.append(c)
    return out


def _check_output(args) -> None:
    from pathlib import Path

    from edgesplit.errors import BundleError

    out = Path(args.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not (out / "manifest.json").is_file():
            raise BundleError(f"{out}: exists and is not a bundle; refusing to overwrite it")
        if not args.force:
            raise BundleError(f"{out}: a bundle exists there; pass --force to replace it (a server may be serving it)")
    if not out.parent.is_dir():
        raise BundleError(f"{out}: directory {out.parent} does not exist")


def run(args) -> int:
    from edgesplit.graph import partition

    _check_output(args)
    cuts = cuts_from_args(args)
    bundle = partition(args.model, cuts, args.output, shapes=shapes_from_args(args) or None, name=args.name,
                       require_bound=True, state=state_pairs(args))
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
    for st in bundle.state:
        print(f"  state {st.output} -> {st.input}  kept by segment {st.segment}", file=out)
    print(f"  segments total {total / 1e6:.2f} MB", file=out)
