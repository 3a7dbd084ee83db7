"""`edgesplit inspect`: list a model's candidate cuts with their tensors and bytes per sample."""

from __future__ import annotations

import json
import sys

from edgesplit.cli.options import add_shape_option, add_state_option, shapes_from_args, state_pairs


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "inspect", help="list candidate cuts: tensors and bytes per sample",
        description="List the narrow closed cuts of an ONNX model (local minima of bytes per sample "
                    "along a topological order), each with every tensor that crosses it.")
    p.add_argument("model", metavar="MODEL", help="the .onnx file")
    p.add_argument("--json", action="store_true", help="print one JSON object with a 'cuts' list")
    p.add_argument("--all", action="store_true", help="every distinct closed cut, not only the narrow ones")
    p.add_argument("--no-run", action="store_true",
                   help="never run the model to measure sizes shape inference left unknown (they count as 1)")
    add_shape_option(p)
    add_state_option(p)
    p.set_defaults(func=run)


def _dims(shape) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _human(n: int) -> str:
    for unit, div in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def run(args) -> int:
    from pathlib import Path

    from edgesplit.graph import GraphIndex, StatePlan, cuts_from_index, eval_dim, infer_shapes, load_model

    shapes = shapes_from_args(args)
    model = load_model(args.model, load_weights=False)
    index = GraphIndex(model)
    info = infer_shapes(model, shapes)
    pairs = state_pairs(args)
    plan = StatePlan(index, info, pairs)
    cuts = cuts_from_index(index, info, narrow=not args.all, model_path=args.model, run=not args.no_run, state=pairs)

    def spec(name):
        t = info.symbolic.get(name)
        return {"name": name, "dtype": t.dtype if t else None,
                "shape": [d if d is not None else "?" for d in (t.dims or ())] if t else None}

    inputs = [spec(v) for v in index.inputs]
    outputs = [spec(v) for v in index.outputs]
    unbound = sorted({d for c in cuts if not c.exact for s in c.specs for d in s.shape
                      if isinstance(d, str) and eval_dim(d, info.symbols) is None})
    if args.json:
        doc = {
            "model": str(args.model),
            "name": Path(args.model).stem,
            "nodes": len(index.order),
            "inputs": inputs,
            "outputs": outputs,
            "symbols": info.symbols,
            "unbound_symbols": unbound,
            "unbound_inputs": info.unbound_inputs(plan.inputs),
            "shape_hint": info.shape_hint(plan.inputs) or None,
            "state": [{"output": o, "input": i} for o, i in plan.pairs],
            "narrow": not args.all,
            "cuts": [c.to_json() for c in cuts],
        }
        json.dump(doc, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    out = sys.stdout
    opsets = ", ".join(f"{o.domain or 'ai.onnx'}:{o.version}" for o in model.opset_import)
    print(f"model   {args.model}  ({len(index.order)} compute nodes, opset {opsets})", file=out)
    for kind, specs in (("input ", inputs), ("output", outputs)):
        for s in specs:
            print(f"{kind}  {s['name']}  {s['dtype']} {_dims(s['shape'] or ['?'])}", file=out)
    free = info.unbound_inputs(plan.inputs)
    if free:
        what = "; ".join(f"input {n} has symbolic dims {', '.join(map(str, d))}" for n, d in free.items())
        print(f"\nnote: {what}: the cuts and their bytes below count them as 1, so they are not the "
              f"model's real cuts. Bind them, e.g. edgesplit inspect {args.model} {info.shape_hint(plan.inputs)}", file=out)
    what = "closed cuts" if args.all else "narrow cuts (local minima of bytes per sample)"
    print(f"\n{len(cuts)} {what}; bytes at batch 1"
          + (f", {', '.join(f'{k}={v}' for k, v in info.symbols.items())}" if info.symbols else ""), file=out)
    print(f"{'cut':>4}  {'after':>9}  {'bytes/sample':>12}  {'':>9}  tensors", file=out)
    for c in cuts:
        specs = sorted(c.specs, key=lambda s: -info.bytes_per_sample(s.name)[0])  # the big one first
        shown = f"{specs[0].name} {_dims(specs[0].shape)}"
        if len(specs) > 1:
            rest = [s.name for s in specs[1:]]
            shown += f"  (+{len(rest)} more: {', '.join(rest[:3])}{', ...' if len(rest) > 3 else ''})"
        mark = "" if c.exact else "*"
        print(f"{c.index:>4}  {c.head_nodes:>4}/{c.total_nodes:<4}  {c.bytes_per_sample:>12,}{mark}"
              f"  {_human(c.bytes_per_sample):>9}  {shown}", file=out)
    if unbound:
        hint = (f"bind the inputs, e.g. {info.shape_hint(plan.inputs)}" if free else
                "inference could not size them" + ("; drop --no-run to measure them" if args.no_run else ""))
        print(f"\n* some dims are unknown and were counted as 1 ({', '.join(unbound[:6])}"
              f"{', ...' if len(unbound) > 6 else ''}): {hint}", file=out)
    print(f"\npartition:  edgesplit partition {args.model} --cut TENSOR[,TENSOR...] -o BUNDLE", file=out)
    return 0
