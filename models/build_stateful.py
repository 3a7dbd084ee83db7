"""Builds the two stateful example models of issue 12 with onnx.helper: a GPT-2-style decoder with a KV cache and stacked GRUs.

Both are written node by node (numpy and onnx only, no torch), with random weights from a
fixed seed, so a rebuild is byte-identical. Each step's state outputs feed the next step's
state inputs:

- models/gpt_decoder.onnx: vocab 256, d_model 64, 4 heads of 16, 4 pre-LN blocks, 256
  learned positions, GELU (tanh form), an untied LM head. Inputs
  `input_ids` int64 [batch, seq] and `past_key_values.{l}.key|value` float32
  [batch, 4, past_seq, 16]; outputs `logits` [batch, seq, 256] and `present.{l}.key|value`
  [batch, 4, total_seq, 16] (total_seq = past_seq + seq; the Hugging Face naming, so
  present.* feeds past_key_values.* next step). The prompt step passes empty pasts
  (past_seq = 0). Cut between blocks 1 and 2 at `h.2.input` [batch, seq, 64].
- models/gru_stack.onnx: two ONNX GRU layers (layout 0: time first), input 16, hidden 32,
  linear_before_reset=1 (as torch.nn.GRU). Inputs `x` [seq, batch, 16], `h0.0`, `h0.1`
  [1, batch, 32]; outputs `y` [seq, batch, 32], `hn.0`, `hn.1` [1, batch, 32]; state pairs
  hn.0=h0.0 and hn.1=h0.1. Cut between the layers at `gru.0.y` [seq, batch, 32].

Every block computes its own positions and causal mask from its own past key's shape
(Shape -> Gather), not from one shared mask: a shared mask would cross every cut as a
second tensor, and the tail would depend on the head's cache length.

Checks (both modes): onnx.checker full_check; ONNX Runtime equals a numpy (float64)
reference of the same math; stepping with the state (prompt, then one token or timestep
at a time) equals one pass over the whole sequence; greedy decoding with the cache equals
greedy decoding without it.

Usage (needs numpy, onnx and onnxruntime):
    python models/build_stateful.py          # write both files and check them
    python models/build_stateful.py --check  # rebuild in memory: exit 1 unless the
                                             # committed files are byte-identical
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
GPT_PATH = HERE / "gpt_decoder.onnx"
GRU_PATH = HERE / "gru_stack.onnx"
OPSET = 17
IR_VERSION = 8
SEED = 12  # issue 12
TOLERANCE = 1e-4  # max abs error, relative to the output scale

VOCAB, D_MODEL, HEADS, LAYERS, MAX_POSITIONS = 256, 64, 4, 4, 256
HEAD_DIM = D_MODEL // HEADS
D_MLP = 4 * D_MODEL
LN_EPS = 1e-5
GPT_CUT = "h.2.input"

GRU_INPUT, GRU_HIDDEN, GRU_LAYERS = 16, 32, 2
GRU_CUT = "gru.0.y"

# Greedy decoding shown in the docs and pinned by tests/test_models_stateful.py.
PROMPT = [[72, 101, 108, 108, 111, 44, 32, 101, 100, 103, 101]]  # b"Hello, edge"
GREEDY_TOKENS = 64


class _Graph:
    """Nodes and initializers with readable names: a node's (first) output is named like the node."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, value) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, outputs: list[str] | None = None, **attrs):
        outputs = outputs or [name]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def model(self, name: str, inputs, outputs, doc: str, value_info=()) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, initializer=self.initializers,
                                  value_info=list(value_info))
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="edgesplit models/build_stateful.py", doc_string=doc)
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model, full_check=True)
        return model


def _f32(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# ---------------------------------------------------------------- GPT decoder


def gpt_weights() -> dict[str, np.ndarray]:
    """Random weights (fixed seed), named like Hugging Face's GPT-2, scaled so every part matters."""
    rng = np.random.default_rng(SEED)
    w = {"wte": _f32(rng, VOCAB, D_MODEL), "wpe": _f32(rng, MAX_POSITIONS, D_MODEL, scale=0.2)}
    for layer in range(LAYERS):
        p = f"h.{layer}."
        for ln in ("ln_1", "ln_2"):
            w[p + ln + ".weight"] = 1 + _f32(rng, D_MODEL, scale=0.1)
            w[p + ln + ".bias"] = _f32(rng, D_MODEL, scale=0.1)
        # Weights are [in, out] (x @ W), GPT-2's Conv1D layout.
        w[p + "attn.c_attn.weight"] = _f32(rng, D_MODEL, 3 * D_MODEL, scale=D_MODEL ** -0.5)
        w[p + "attn.c_attn.bias"] = _f32(rng, 3 * D_MODEL, scale=0.1)
        w[p + "attn.c_proj.weight"] = _f32(rng, D_MODEL, D_MODEL, scale=D_MODEL ** -0.5)
        w[p + "attn.c_proj.bias"] = _f32(rng, D_MODEL, scale=0.1)
        w[p + "mlp.c_fc.weight"] = _f32(rng, D_MODEL, D_MLP, scale=D_MODEL ** -0.5)
        w[p + "mlp.c_fc.bias"] = _f32(rng, D_MLP, scale=0.1)
        w[p + "mlp.c_proj.weight"] = _f32(rng, D_MLP, D_MODEL, scale=D_MLP ** -0.5)
        w[p + "mlp.c_proj.bias"] = _f32(rng, D_MODEL, scale=0.1)
    w["ln_f.weight"] = 1 + _f32(rng, D_MODEL, scale=0.1)
    w["ln_f.bias"] = _f32(rng, D_MODEL, scale=0.1)
    w["lm_head.weight"] = _f32(rng, D_MODEL, VOCAB, scale=D_MODEL ** -0.5)
    return w


def _gelu(g: _Graph, x: str, name: str) -> str:
    # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): GPT-2's GELU; opset 17 has no Gelu op.
    x3 = g.op("Mul", [g.op("Mul", [x, x], name + ".x2"), x], name + ".x3")
    inner = g.op("Add", [x, g.op("Mul", [x3, "const.gelu_cubic"], name + ".cubic")], name + ".inner")
    t = g.op("Tanh", [g.op("Mul", [inner, "const.gelu_scale"], name + ".scaled")], name + ".tanh")
    half_x = g.op("Mul", [x, "const.half"], name + ".half_x")
    return g.op("Mul", [half_x, g.op("Add", [t, "const.one"], name + ".one_plus")], name)


def _linear(g: _Graph, x: str, prefix: str) -> str:
    return g.op("Add", [g.op("MatMul", [x, prefix + ".weight"], prefix + ".matmul"), prefix + ".bias"], prefix)


def _block(g: _Graph, layer: int, h: str, out: str) -> None:
    p = f"h.{layer}."
    past_k, past_v = f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"
    # Positions of this step's queries and of all keys, from this block's own cache length.
    past_len = g.op("Gather", [g.op("Shape", [past_k], p + "attn.past_shape"), "const.two"], p + "attn.past_len")
    seq = g.op("Gather", [g.op("Shape", [h], p + "attn.h_shape"), "const.one_i"], p + "attn.seq_len")
    total = g.op("Add", [past_len, seq], p + "attn.total_len")
    q_pos = g.op("Range", [past_len, total, "const.one_i"], p + "attn.query_positions")
    k_pos = g.op("Range", ["const.zero_i", total, "const.one_i"], p + "attn.key_positions")
    allowed = g.op("LessOrEqual", [g.op("Unsqueeze", [k_pos, "const.axis0"], p + "attn.key_row"),
                                   g.op("Unsqueeze", [q_pos, "const.axis1"], p + "attn.query_col")],
                   p + "attn.causal")  # [seq, total]: key j visible to query i iff j <= past_len + i

    x = g.op("LayerNormalization", [h, p + "ln_1.weight", p + "ln_1.bias"], p + "ln_1", axis=-1, epsilon=LN_EPS)
    qkv = _linear(g, x, p + "attn.c_attn")
    q, k, v = g.op("Split", [qkv, "const.qkv_split"], p + "attn.split",
                   outputs=[p + "attn.q", p + "attn.k", p + "attn.v"], axis=-1)

    def heads(t: str) -> str:  # [batch, seq, 64] -> [batch, 4, seq, 16]
        return g.op("Transpose", [g.op("Reshape", [t, "const.heads_shape"], t + ".split_heads")], t + ".heads",
                    perm=[0, 2, 1, 3])

    present_k = g.op("Concat", [past_k, heads(k)], f"present.{layer}.key", axis=2)
    present_v = g.op("Concat", [past_v, heads(v)], f"present.{layer}.value", axis=2)
    k_t = g.op("Transpose", [present_k], p + "attn.key_t", perm=[0, 1, 3, 2])
    scores = g.op("Mul", [g.op("MatMul", [heads(q), k_t], p + "attn.qk"), "const.attn_scale"], p + "attn.scores")
    masked = g.op("Where", [allowed, scores, "const.mask_value"], p + "attn.masked_scores")
    probs = g.op("Softmax", [masked], p + "attn.probs", axis=-1)
    ctx = g.op("Transpose", [g.op("MatMul", [probs, present_v], p + "attn.context_heads")], p + "attn.context_t",
               perm=[0, 2, 1, 3])
    ctx = g.op("Reshape", [ctx, "const.merge_shape"], p + "attn.context")
    h = g.op("Add", [h, _linear(g, ctx, p + "attn.c_proj")], p + "attn.residual")

    x = g.op("LayerNormalization", [h, p + "ln_2.weight", p + "ln_2.bias"], p + "ln_2", axis=-1, epsilon=LN_EPS)
    m = _linear(g, _gelu(g, _linear(g, x, p + "mlp.c_fc"), p + "mlp.gelu"), p + "mlp.c_proj")
    g.op("Add", [h, m], out)


def build_gpt() -> onnx.ModelProto:
    w = gpt_weights()
    g = _Graph()
    for name, value in w.items():
        g.const(name, value)
    for name, value in {
        "const.zero_i": np.int64(0), "const.one_i": np.int64(1), "const.two": np.int64(2),
        "const.axis0": np.array([0], np.int64), "const.axis1": np.array([1], np.int64),
        "const.qkv_split": np.array([D_MODEL] * 3, np.int64),
        "const.heads_shape": np.array([0, 0, HEADS, HEAD_DIM], np.int64),
        "const.merge_shape": np.array([0, 0, D_MODEL], np.int64),
        "const.attn_scale": np.float32(HEAD_DIM ** -0.5),
        # The most negative float32, as Hugging Face masks: exp() of it is exactly 0 and no inf appears.
        "const.mask_value": np.float32(np.finfo(np.float32).min),
        "const.gelu_cubic": np.float32(0.044715), "const.gelu_scale": np.float32(np.sqrt(2 / np.pi)),
        "const.half": np.float32(0.5), "const.one": np.float32(1.0),
    }.items():
        g.const(name, value)

    past_len = g.op("Gather", [g.op("Shape", ["past_key_values.0.key"], "embed.past_shape"), "const.two"],
                    "embed.past_len")
    seq = g.op("Gather", [g.op("Shape", ["input_ids"], "embed.ids_shape"), "const.one_i"], "embed.seq_len")
    positions = g.op("Range", [past_len, g.op("Add", [past_len, seq], "embed.total_len"), "const.one_i"],
                     "embed.position_ids")
    g.op("Add", [g.op("Gather", ["wte", "input_ids"], "embed.tokens"),
                 g.op("Gather", ["wpe", positions], "embed.positions")], "h.0.input")
    for layer in range(LAYERS):
        _block(g, layer, f"h.{layer}.input", f"h.{layer + 1}.input" if layer + 1 < LAYERS else "ln_f.input")
    x = g.op("LayerNormalization", ["ln_f.input", "ln_f.weight", "ln_f.bias"], "ln_f", axis=-1, epsilon=LN_EPS)
    g.op("MatMul", [x, "lm_head.weight"], "logits")

    cache = ["batch", HEADS, "past_seq", HEAD_DIM]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB])]
    for layer in range(LAYERS):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{layer}.{kind}", TensorProto.FLOAT, cache))
            outputs.append(helper.make_tensor_value_info(f"present.{layer}.{kind}", TensorProto.FLOAT,
                                                         ["batch", HEADS, "total_seq", HEAD_DIM]))
    # Shape inference loses `seq` where the [seq, 64] positions broadcast against the tokens:
    # name the residual stream's shape, so the cut's spec says [batch, seq, 64].
    stream = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "seq", D_MODEL])
              for name in [f"h.{layer}.input" for layer in range(LAYERS)] + ["ln_f.input"]]
    return g.model("gpt_decoder", inputs, outputs,
                   "GPT-2-style decoder with a KV cache (edgesplit issue 12), random weights; "
                   "present.* feeds past_key_values.* at the next step; cut at h.2.input.", stream)


def _layer_norm(x, weight, bias):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + LN_EPS) * weight + bias


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def gpt_reference(w: dict, input_ids: np.ndarray, past: list[tuple[np.ndarray, np.ndarray]]):
    """The decoder's math in float64 numpy. Returns (logits, [(present_key, present_value)] per layer)."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    batch, seq = input_ids.shape
    positions = past[0][0].shape[2] + np.arange(seq)
    h = w["wte"][input_ids] + w["wpe"][positions]

    def heads(t):
        return t.reshape(batch, seq, HEADS, HEAD_DIM).transpose(0, 2, 1, 3)

    presents = []
    for layer in range(LAYERS):
        p = f"h.{layer}."
        x = _layer_norm(h, w[p + "ln_1.weight"], w[p + "ln_1.bias"])
        q, k, v = np.split(x @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"], 3, axis=-1)
        k = np.concatenate([past[layer][0], heads(k)], axis=2)
        v = np.concatenate([past[layer][1], heads(v)], axis=2)
        scores = heads(q) @ k.transpose(0, 1, 3, 2) * HEAD_DIM ** -0.5
        visible = np.arange(k.shape[2])[None, :] <= positions[:, None]
        ctx = _softmax(np.where(visible, scores, -np.inf)) @ v
        ctx = ctx.transpose(0, 2, 1, 3).reshape(batch, seq, D_MODEL)
        h = h + ctx @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
        m = _layer_norm(h, w[p + "ln_2.weight"], w[p + "ln_2.bias"]) @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"]
        m = 0.5 * m * (1 + np.tanh(np.sqrt(2 / np.pi) * (m + 0.044715 * m ** 3)))
        h = h + m @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]
        presents.append((k, v))
    return _layer_norm(h, w["ln_f.weight"], w["ln_f.bias"]) @ w["lm_head.weight"], presents


def empty_past(batch: int) -> dict[str, np.ndarray]:
    """The prompt step's state: every cache of length 0."""
    zeros = np.zeros((batch, HEADS, 0, HEAD_DIM), np.float32)
    return {f"past_key_values.{layer}.{kind}": zeros for layer in range(LAYERS) for kind in ("key", "value")}


def gpt_step(session, input_ids: np.ndarray, past: dict[str, np.ndarray]):
    """One decoder run: (logits, next past) where the next past is this step's present.* renamed."""
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(names, {"input_ids": input_ids, **past}), strict=True))
    return values["logits"], {"past_key_values." + n[len("present."):]: v for n, v in values.items()
                              if n.startswith("present.")}


def greedy(session, prompt, tokens: int = GREEDY_TOKENS, cache: bool = True):
    """Greedy decoding: the prompt, then one token a step with the cache (or the whole sequence each step)."""
    ids = np.asarray(prompt, np.int64)
    past = empty_past(ids.shape[0])
    logits, past = gpt_step(session, ids, past)
    out = []
    for _ in range(tokens):
        nxt = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        out.append(nxt)
        ids = np.concatenate([ids, nxt], axis=1)
        if cache:
            logits, past = gpt_step(session, nxt, past)
        else:
            logits, _ = gpt_step(session, ids, empty_past(ids.shape[0]))
    return np.concatenate(out, axis=1)


# ---------------------------------------------------------------- stacked GRU


def gru_weights() -> dict[str, np.ndarray]:
    """ONNX GRU layout, gates in z, r, h order; uniform(+-1/sqrt(hidden)) as torch initialises."""
    rng = np.random.default_rng(SEED + 1)
    bound = GRU_HIDDEN ** -0.5
    w = {}
    for layer in range(GRU_LAYERS):
        fan_in = GRU_INPUT if layer == 0 else GRU_HIDDEN
        w[f"gru.{layer}.W"] = rng.uniform(-bound, bound, (1, 3 * GRU_HIDDEN, fan_in)).astype(np.float32)
        w[f"gru.{layer}.R"] = rng.uniform(-bound, bound, (1, 3 * GRU_HIDDEN, GRU_HIDDEN)).astype(np.float32)
        w[f"gru.{layer}.B"] = rng.uniform(-bound, bound, (1, 6 * GRU_HIDDEN)).astype(np.float32)
    return w


def build_gru() -> onnx.ModelProto:
    w = gru_weights()
    g = _Graph()
    for name, value in w.items():
        g.const(name, value)
    g.const("const.num_directions_axis", np.array([1], np.int64))
    x = "x"
    for layer in range(GRU_LAYERS):
        y_dirs = g.op("GRU", [x, f"gru.{layer}.W", f"gru.{layer}.R", f"gru.{layer}.B", "", f"h0.{layer}"],
                      f"gru.{layer}", outputs=[f"gru.{layer}.Y", f"hn.{layer}"],
                      hidden_size=GRU_HIDDEN, linear_before_reset=1)[0]
        # Y is [seq, num_directions=1, batch, hidden]: drop the direction axis.
        x = g.op("Squeeze", [y_dirs, "const.num_directions_axis"], "y" if layer + 1 == GRU_LAYERS else f"gru.{layer}.y")
    state = [1, "batch", GRU_HIDDEN]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["seq", "batch", GRU_INPUT])]
    inputs += [helper.make_tensor_value_info(f"h0.{layer}", TensorProto.FLOAT, state) for layer in range(GRU_LAYERS)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["seq", "batch", GRU_HIDDEN])]
    outputs += [helper.make_tensor_value_info(f"hn.{layer}", TensorProto.FLOAT, state) for layer in range(GRU_LAYERS)]
    return g.model("gru_stack", inputs, outputs,
                   "Two stacked GRUs (edgesplit issue 12), random weights, time-first; state pairs "
                   "hn.0=h0.0 and hn.1=h0.1; cut at gru.0.y.")


def gru_reference(w: dict, x: np.ndarray, h0: list[np.ndarray]):
    """Stacked GRUs with linear_before_reset=1 in float64 numpy. Returns (y, [hn per layer])."""
    hn = []
    for layer in range(GRU_LAYERS):
        wx, rh = w[f"gru.{layer}.W"][0].astype(np.float64), w[f"gru.{layer}.R"][0].astype(np.float64)
        wb, rb = np.split(w[f"gru.{layer}.B"][0].astype(np.float64), 2)
        h = h0[layer][0].astype(np.float64)
        ys = []
        for xt in x:
            gx, gh = xt @ wx.T + wb, h @ rh.T + rb
            z = 1 / (1 + np.exp(-(gx[:, :GRU_HIDDEN] + gh[:, :GRU_HIDDEN])))
            r = 1 / (1 + np.exp(-(gx[:, GRU_HIDDEN:2 * GRU_HIDDEN] + gh[:, GRU_HIDDEN:2 * GRU_HIDDEN])))
            candidate = np.tanh(gx[:, 2 * GRU_HIDDEN:] + r * gh[:, 2 * GRU_HIDDEN:])
            h = (1 - z) * candidate + z * h
            ys.append(h)
        x = np.stack(ys)
        hn.append(h[None])
    return x, hn


def gru_steps(session, x: np.ndarray, h0: list[np.ndarray]):
    """One timestep a run, hn.* fed back as h0.*: returns (y, [hn per layer]) like one whole-sequence run."""
    state = {f"h0.{layer}": h for layer, h in enumerate(h0)}
    ys = []
    for t in range(x.shape[0]):
        y, *hn = session.run(["y"] + [f"hn.{layer}" for layer in range(GRU_LAYERS)], {"x": x[t:t + 1], **state})
        state = {f"h0.{layer}": h for layer, h in enumerate(hn)}
        ys.append(y)
    return np.concatenate(ys), list(state.values())


# ---------------------------------------------------------------- checks


def _session(model: onnx.ModelProto | Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _error(got, want) -> float:
    """Max abs difference relative to the reference's scale (at least 1)."""
    return float(np.abs(np.asarray(got, np.float64) - want).max() / max(1.0, float(np.abs(want).max())))


def check_gpt(model: onnx.ModelProto) -> dict[str, float]:
    session, w = _session(model), gpt_weights()
    rng = np.random.default_rng(SEED + 2)
    ids = rng.integers(0, VOCAB, (2, 13)).astype(np.int64)
    full, full_past = gpt_step(session, ids, empty_past(2))
    ref, ref_presents = gpt_reference(w, ids, [(np.zeros((2, HEADS, 0, HEAD_DIM)),) * 2] * LAYERS)
    errors = {"full vs numpy": _error(full, ref)}
    errors["present vs numpy"] = max(_error(full_past[f"past_key_values.{layer}.{kind}"], ref_presents[layer][i])
                                     for layer in range(LAYERS) for i, kind in enumerate(("key", "value")))
    # A prompt of 5, then one token a step, with the cache.
    logits, past = gpt_step(session, ids[:, :5], empty_past(2))
    steps = [logits]
    for t in range(5, ids.shape[1]):
        logits, past = gpt_step(session, ids[:, t:t + 1], past)
        steps.append(logits)
    errors["incremental vs full"] = _error(np.concatenate(steps, axis=1), full)
    errors["incremental cache vs full"] = max(_error(past[k], full_past[k]) for k in past)
    # A multi-token step on a non-empty cache, against numpy.
    ref_past = [(full_past[f"past_key_values.{layer}.key"].astype(np.float64)[:, :, :9],
                 full_past[f"past_key_values.{layer}.value"].astype(np.float64)[:, :, :9]) for layer in range(LAYERS)]
    chunk, _ = gpt_step(session, ids[:, 9:], {k: v[:, :, :9] for k, v in full_past.items()})
    errors["chunk on a cache vs numpy"] = _error(chunk, gpt_reference(w, ids[:, 9:], ref_past)[0])
    for name, err in errors.items():
        if err > TOLERANCE:
            raise AssertionError(f"gpt_decoder: {name}: error {err:.2e} > {TOLERANCE}")
    with_cache, without = greedy(session, PROMPT), greedy(session, PROMPT, cache=False)
    if not np.array_equal(with_cache, without):
        raise AssertionError(f"gpt_decoder: greedy with the cache {with_cache} != without {without}")
    if not np.array_equal(with_cache, _greedy_reference(w)):
        raise AssertionError("gpt_decoder: greedy tokens differ from the numpy reference's")
    return errors


def _greedy_reference(w: dict) -> np.ndarray:
    ids = np.asarray(PROMPT, np.int64)
    logits, past = gpt_reference(w, ids, [(np.zeros((ids.shape[0], HEADS, 0, HEAD_DIM)),) * 2] * LAYERS)
    out = []
    for _ in range(GREEDY_TOKENS):
        out.append(logits[:, -1].argmax(-1)[:, None])
        logits, past = gpt_reference(w, out[-1], past)
    return np.concatenate(out, axis=1)


def check_gru(model: onnx.ModelProto) -> dict[str, float]:
    session, w = _session(model), gru_weights()
    rng = np.random.default_rng(SEED + 3)
    x = rng.standard_normal((17, 3, GRU_INPUT)).astype(np.float32)
    h0 = [rng.standard_normal((1, 3, GRU_HIDDEN)).astype(np.float32) for _ in range(GRU_LAYERS)]
    feeds = {"x": x, **{f"h0.{layer}": h for layer, h in enumerate(h0)}}
    y, *hn = session.run(["y"] + [f"hn.{layer}" for layer in range(GRU_LAYERS)], feeds)
    ref_y, ref_hn = gru_reference(w, x, h0)
    step_y, step_hn = gru_steps(session, x, h0)
    errors = {"full vs numpy": max([_error(y, ref_y)] + [_error(a, b) for a, b in zip(hn, ref_hn, strict=True)]),
              "stepped vs full": max([_error(step_y, y)] + [_error(a, b) for a, b in zip(step_hn, hn, strict=True)])}
    for name, err in errors.items():
        if err > TOLERANCE:
            raise AssertionError(f"gru_stack: {name}: error {err:.2e} > {TOLERANCE}")
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 unless the committed files equal a rebuild")
    args = parser.parse_args(argv)
    stale = []
    for path, build, check in ((GPT_PATH, build_gpt, check_gpt), (GRU_PATH, build_gru, check_gru)):
        model = build()
        data = model.SerializeToString()
        if args.check:
            if not path.exists() or path.read_bytes() != data:
                stale.append(path.name)
        else:
            path.write_bytes(data)
        errors = check(model)
        params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
        print(f"{path.name}: {len(data):,} bytes, {params:,} parameters, {len(model.graph.node)} nodes; "
              + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    session = _session(GPT_PATH if args.check else build_gpt())
    print(f"greedy {GREEDY_TOKENS} tokens after {PROMPT[0]}: {greedy(session, PROMPT)[0].tolist()}")
    if stale:
        print(f"stale: {', '.join(stale)} differ from a rebuild; run python models/build_stateful.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
