"""Shape and dtype inference for the tensors that may cross a cut.

Two passes of ONNX shape inference on a weightless copy of the graph: one keeps the model's
symbolic dims (for the specs a bundle stores), one binds them (dynamic batch = 1, the user's
``shapes``) to count bytes per sample.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from edgesplit.errors import ConfigError
from edgesplit.graph._load import load_model, weightless

# Dtypes that a bundle tensor (and so a wire tensor) may have (edgesplit.bundle.DTYPES).
WIRE_DTYPES = frozenset(
    {"float32", "float16", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32",
     "int64", "uint64", "bool"}
)

Dim = "int | str | None"


@dataclass(frozen=True)
class TensorType:
    """What inference knows about one tensor: numpy dtype name (or None) and dims."""

    dtype: str | None  # None: not a tensor, or unknown
    elem_type: int  # onnx TensorProto.DataType, 0 when unknown
    dims: tuple | None  # int (known), str (symbolic), None (unknown); None: rank unknown


def np_dtype_name(elem_type: int) -> str | None:
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name
    except Exception:  # bfloat16, float8, string, undefined
        return None


def _type_of(tp: onnx.TypeProto) -> TensorType:
    if not tp.HasField("tensor_type"):
        return TensorType(None, 0, None)
    tt = tp.tensor_type
    dims = None
    if tt.HasField("shape"):
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param if d.HasField("dim_param") and d.dim_param else None)
            for d in tt.shape.dim
        )
    return TensorType(np_dtype_name(tt.elem_type) if tt.elem_type else None, tt.elem_type, dims)


def parse_shape_option(text: str) -> tuple[str, tuple[int | str, ...]]:
    """Parse ``name=1x3x224x224`` (or ``name=1,3,224,224``; ``name=128`` for a dim symbol)."""
    name, sep, dims = text.partition("=")
    name = name.strip()
    if not sep or not name or not dims.strip():
        raise ConfigError(f"--shape {text!r}: expected NAME=DIMS, e.g. input=1x3x224x224 or seq=128")
    out: list[int | str] = []
    for tok in re.split(r"[x,\s]+", dims.strip().strip("[]()")):
        if not tok:
            continue
        if tok.isdigit():
            out.append(int(tok))
        elif re.fullmatch(r"[A-Za-z_][\w.]*", tok):
            out.append(tok)
        else:
            raise ConfigError(f"--shape {text!r}: {tok!r} is neither a size nor a symbol name")
    if not out:
        raise ConfigError(f"--shape {text!r}: no dims given")
    return name, tuple(out)


def eval_dim(expr: str, symbols: dict[str, int]) -> int | None:
    """The value of a symbolic dim such as "4*N" or "N*T" (exporters write these), or None."""
    if expr in symbols:
        return symbols[expr]
    if expr.startswith("unk__") or expr.startswith("?"):
        return None
    import ast

    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        return None

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return symbols[node.id]
        if isinstance(node, ast.BinOp):
            a, b = ev(node.left), ev(node.right)
            ops = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b,
                   ast.FloorDiv: lambda: a // b, ast.Div: lambda: a // b, ast.Mod: lambda: a % b}
            if type(node.op) in ops:
                return ops[type(node.op)]()
        raise KeyError(expr)

    try:
        value = ev(tree)
    except (KeyError, ZeroDivisionError, RecursionError):
        return None
    return value if isinstance(value, int) and value >= 0 else None




def _bind_inputs(m: onnx.ModelProto, bindings: dict[str, tuple], symbols: dict[str, int]) -> None:
    for vi in m.graph.input:
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = vi.type.tensor_type.shape.dim
        want = bindings.get(vi.name)
        for axis, d in enumerate(dims):
            val = None
            if want is not None and isinstance(want[axis], int):
                val = want[axis]
            elif d.HasField("dim_value"):
                continue
            elif d.HasField("dim_param") and d.dim_param in symbols:
                val = symbols[d.dim_param]
            if val is not None:
                d.Clear()
                d.dim_value = val


def _infer(m: onnx.ModelProto) -> dict[str, TensorType]:
    try:
        inferred = onnx.shape_inference.infer_shapes(m, check_type=False, strict_mode=False, data_prop=True)
    except Exception:
        try:
            inferred = onnx.shape_inference.infer_shapes(m, check_type=False, strict_mode=False)
        except Exception:
            inferred = m
    g = inferred.graph
    out: dict[str, TensorType] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        t = _type_of(vi.type)
        old = out.get(vi.name)
        if old is None or (old.dims is None and t.dims is not None) or (not old.elem_type and t.elem_type):
            out[vi.name] = t
    return out


# Dim names that mean "the batch" wherever they stand.
_BATCH_NAMES = frozenset({"n", "b", "bs", "batch", "batch_size", "batchsize", "batch_dim"})


@dataclass
class ShapeInfo:
    """Symbolic and bound types of every top-level tensor, and how the symbols were bound."""

    symbolic: dict[str, TensorType]
    bound: dict[str, TensorType]
    symbols: dict[str, int]  # dim symbol -> size used for bytes
    inputs: dict[str, tuple]  # the input shapes used for bytes (after binding)
    batch_symbol: str | None = None  # the symbol on axis 0 of the batched inputs, if one
    input_symbols: frozenset = frozenset()  # every symbol on the model inputs

    def dtype(self, name: str) -> str | None:
        t = self.symbolic.get(name) or self.bound.get(name)
        return t.dtype if t else None

    def elem_type(self, name: str) -> int:
        t = self.symbolic.get(name) or self.bound.get(name)
        return t.elem_type if t else 0

    def spec_dims(self, name: str, unknown: "UnknownNamer") -> tuple | None:
        """Dims for a bundle spec: ints, symbols, unknown ones named by `unknown`."""
        t = self.symbolic.get(name)
        dims = t.dims if t else None
        if dims is None:
            b = self.bound.get(name)
            if b is None or b.dims is None:
                return None
            dims = tuple(None for _ in b.dims)
        return tuple(d if d is not None else unknown(name, axis) for axis, d in enumerate(dims))

    def unbound_inputs(self, exclude=()) -> dict[str, list[str]]:
        """Model input -> its symbolic dims, other than the batch, that nothing bound.

        Their sizes are unknown, so the bytes of every cut below them would be a guess: the
        user must bind them (see shape_hint). The batch is axis 0, or a dim named like one
        (N, batch, batch_size: recurrent models put time first). Inputs in `exclude` (state
        inputs, whose length grows with the session) are left out."""
        out: dict[str, list[str]] = {}
        for name in self.inputs:
            if name in exclude:
                continue
            t = self.symbolic.get(name)
            dims = t.dims if t is not None and t.dims else ()
            free = [d for axis, d in enumerate(dims) if axis > 0 and isinstance(d, str)
                    and d.lower() not in _BATCH_NAMES and eval_dim(d, self.symbols) is None]
            if free:
                out[name] = free
        return out

    def shape_hint(self, exclude=()) -> str:
        """An example --shape binding every unbound input dim ("--shape image=1x3x224x224")."""
        parts = []
        for name in self.unbound_inputs(exclude):
            dims = self.symbolic[name].dims
            size = 224 if len(dims) == 4 else 128  # an image side, else a sequence length
            shown = [str(d) if isinstance(d, int) else ("1" if axis == 0 else
                     str(eval_dim(d, self.symbols) or size)) for axis, d in enumerate(dims)]
            parts.append(f"--shape {name}={'x'.join(shown)}")
        return " ".join(parts)

    def bytes_per_sample(self, name: str) -> tuple[int, bool]:
        """(bytes, exact): symbolic dims as bound; unknown ones count as 1 and make it inexact."""
        key = (name, self.symbolic.get(name), self.bound.get(name))
        cache = self.__dict__.setdefault("_bytes_cache", {})
        if key not in cache:
            cache[key] = self._bytes(name)
        return cache[key]

    def _bytes(self, name: str) -> tuple[int, bool]:
        sym, bound = self.symbolic.get(name), self.bound.get(name)
        t = sym if sym is not None and sym.dtype else bound
        if t is None or t.dtype is None:
            return 0, False
        dims = sym.dims if sym is not None and sym.dims is not None else (bound.dims if bound else None)
        if dims is None:
            return np.dtype(t.dtype).itemsize, False
        other = bound.dims if bound is not None and bound.dims is not None and len(bound.dims) == len(dims) else None
        n, exact = 1, True
        for axis, d in enumerate(dims):
            v = d if isinstance(d, int) else (eval_dim(d, self.symbols) if isinstance(d, str) else None)
            if v is None and other is not None and isinstance(other[axis], int):
                v = other[axis]
            if v is None:
                exact = False
            else:
                n *= v
        return n * np.dtype(t.dtype).itemsize, exact


class UnknownNamer:
    """Names dims that inference could not name: "?1", "?2", ... each matching any size on its own.

    (Calling them all "N" would tell the wire protocol that they are equal to the batch.)
    """

    def __init__(self):
        self.count = 0

    def __call__(self, name: str, axis: int) -> str:
        self.count += 1
        return f"?{self.count}"


def _name_input_dims(m: onnx.ModelProto) -> None:
    """Give unnamed dims of the graph inputs a symbol (axis 0: "N"), so inference carries it along."""
    for vi in m.graph.input:
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if not d.HasField("dim_value") and not (d.HasField("dim_param") and d.dim_param):
                d.dim_param = "N" if axis == 0 else f"{vi.name}_dim{axis}"


def infer_shapes(model: onnx.ModelProto, shapes: dict[str, tuple] | None = None) -> ShapeInfo:
    """Infer dtypes and shapes of every top-level tensor.

    Args:
        model: the model (weights need not be loaded).
        shapes: input name -> dims, or dim symbol -> size (``{"seq": 128}``) to bind symbolic
            dims for bytes per sample. A dynamic batch (symbolic axis 0 of an input) is 1.
    """
    base = weightless(model)
    _name_input_dims(base)
    symbolic = _infer(base)
    graph_inputs = {vi.name: _type_of(vi.type) for vi in model.graph.input}
    bindings: dict[str, tuple] = {}
    symbols: dict[str, int] = {}
    for key, dims in (shapes or {}).items():
        dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
        if key in graph_inputs:
            have = graph_inputs[key].dims
            if have is not None and len(have) != len(dims):
                raise ConfigError(f"shape for input {key!r} has {len(dims)} dims; the model says "
                                  f"{len(have)} ({'x'.join(str(d) for d in have)})")
            for axis, d in enumerate(dims):
                if have is not None and isinstance(have[axis], int) and isinstance(d, int) and have[axis] != d:
                    raise ConfigError(f"shape for input {key!r}: axis {axis} is fixed at {have[axis]} in the model, not {d}")
                if have is not None and isinstance(have[axis], str) and isinstance(d, int):
                    symbols.setdefault(have[axis], d)
            bindings[key] = dims
        elif len(dims) == 1 and isinstance(dims[0], int) and _is_symbol(model, key):
            symbols[key] = dims[0]
        else:
            names = ", ".join(n for n in graph_inputs) or "none"
            raise ConfigError(f"shape {key!r}: no model input or dim symbol has that name (inputs: {names})")
    # Dynamic batch = 1: a symbolic (or unknown) axis 0 of an input that nothing else binds.
    for name, t in graph_inputs.items():
        if t.dims and name not in bindings:
            d0 = t.dims[0]
            if isinstance(d0, str):
                symbols.setdefault(d0, 1)
            elif d0 is None:
                bindings[name] = (1,) + tuple(t.dims[1:])
    if symbols or bindings:
        # without the file's value_info, which may hold symbolic dims that would stay unbound
        bound_model = weightless(model, value_info=False)
        _bind_inputs(bound_model, bindings, symbols)
        bound = _infer(bound_model)
    else:
        bound = symbolic
    used_inputs = {name: (bound.get(name).dims if name in bound and bound[name].dims is not None else t.dims)
                   for name, t in graph_inputs.items()}
    firsts = {t.dims[0] for n, t in symbolic.items() if n in graph_inputs and t.dims and isinstance(t.dims[0], str)}
    in_syms = frozenset(d for n, t in symbolic.items() if n in graph_inputs and t.dims for d in t.dims
                        if isinstance(d, str))
    return ShapeInfo(symbolic, bound, symbols, used_inputs, firsts.pop() if len(firsts) == 1 else None, in_syms)


def _probe_runs(model_path, model: onnx.ModelProto, info: ShapeInfo, names: list[str], batches=(None,)):
    """Run the model in ONNX Runtime with `names` as extra outputs, once per batch size
    (None: the bound input shapes). Returns one list of arrays per batch, or None."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None

    full = onnx.ModelProto()
    if model_path is not None:
        full = load_model(model_path, load_weights=True, check=False)
    else:
        full.CopyFrom(model)
    if full.ByteSize() >= (1 << 31) - (1 << 20):
        return None
    present = {o.name for o in full.graph.output}
    for n in names:
        if n not in present:
            vi = full.graph.output.add()
            vi.name = n
    inits = {t.name for t in full.graph.initializer}
    shapes = {}
    for vi in full.graph.input:
        if vi.name in inits:
            continue
        t = info.bound.get(vi.name) or _type_of(vi.type)
        if t.dims is None or t.dtype is None or any(not isinstance(d, int) for d in t.dims):
            return None
        sym = info.symbolic.get(vi.name)
        batched = bool(sym and sym.dims and info.batch_symbol and sym.dims[0] == info.batch_symbol)
        shapes[vi.name] = (np.dtype(t.dtype), tuple(t.dims), batched)
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(full.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        results = []
        for b in batches:
            rng = np.random.default_rng(0)
            feeds = {}
            for name, (dt, dims, batched) in shapes.items():
                if b is not None and batched:
                    dims = (b,) + dims[1:]
                feeds[name] = (rng.standard_normal(dims).astype(dt) if dt.kind == "f"
                               else rng.integers(0, 2, dims).astype(dt))
            results.append(sess.run(names, feeds))
        return results
    except Exception:  # the probe is best effort; callers report what stays unknown
        return None


def probe_with_onnxruntime(model_path, model: onnx.ModelProto, info: ShapeInfo, names: list[str]) -> list[str]:
    """Learn dtype, rank and bound sizes of `names` that inference left unknown by running the model once.

    ONNX shape inference gives up on some ops (a Loop's carried values, custom ops, a ViT's
    class-token Concat). Here the model runs in ONNX Runtime on random inputs (batch 1,
    symbols as bound) with those tensors as extra outputs. Dims stay symbolic (unknown)
    unless inference knew them. Returns the names it could fill.
    """
    runs = _probe_runs(model_path, model, info, names)
    if runs is None:
        return []
    filled = []
    for n, arr in zip(names, runs[0]):
        if not isinstance(arr, np.ndarray):
            continue
        elem = helper.np_dtype_to_tensor_dtype(arr.dtype)
        old = info.symbolic.get(n)
        dims = old.dims if old is not None and old.dims is not None and len(old.dims) == arr.ndim else None
        info.symbolic[n] = TensorType(arr.dtype.name, elem, dims if dims is not None else (None,) * arr.ndim)
        info.bound[n] = TensorType(arr.dtype.name, elem, tuple(arr.shape))
        filled.append(n)
    return filled


def name_batch_axes(model_path, model: onnx.ModelProto, info: ShapeInfo, names) -> list[str]:
    """Give the model's batch symbol to axis 0 of `names` where inference lost it.

    After a Reshape or a Concat the leading dim may be unnamed ("unk__3"). The model runs at
    batch 1 and 2; a tensor whose axis 0 follows the batch while its other dims stay put gets
    the batch symbol, so the cloud can batch requests at that cut.
    """
    b = info.batch_symbol
    if not b:
        return []
    todo = [n for n in dict.fromkeys(names)
            if (t := info.symbolic.get(n)) is not None and t.dims and t.dims[0] != b
            and not isinstance(t.dims[0], int) and not (isinstance(t.dims[0], str) and t.dims[0] in info.input_symbols)]
    if not todo:
        return []
    runs = _probe_runs(model_path, model, info, todo, batches=(1, 2))
    if runs is None:
        return []
    done = []
    for n, a1, a2 in zip(todo, runs[0], runs[1]):
        if (isinstance(a1, np.ndarray) and isinstance(a2, np.ndarray) and a1.ndim == a2.ndim >= 1
                and a1.shape[0] == 1 and a2.shape[0] == 2 and a1.shape[1:] == a2.shape[1:]):
            t = info.symbolic[n]
            info.symbolic[n] = TensorType(t.dtype, t.elem_type, (b,) + tuple(t.dims[1:]))
            done.append(n)
    return done


def _is_symbol(model: onnx.ModelProto, name: str) -> bool:
    for vi in model.graph.input:
        if vi.type.HasField("tensor_type"):
            for d in vi.type.tensor_type.shape.dim:
                if d.HasField("dim_param") and d.dim_param == name:
                    return True
    return False
