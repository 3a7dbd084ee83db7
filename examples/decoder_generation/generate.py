"""Greedy token generation through edge + cloud: a GPT-style decoder split at a middle layer, each side keeping its KV cache.

    python examples/decoder_generation/generate.py                    # 64 tokens, a local cloud on loopback
    python examples/decoder_generation/generate.py --tokens 16 --prompt "Hi"
    python examples/decoder_generation/generate.py --server tcp://cloud:5555 --bundle gpt.bundle

Only public names: edge_agent (EdgeAgent, AgentConfig, LocalCloud) and edgesplit (partition,
Bundle, SegmentRunner).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edge_agent import AgentConfig, EdgeAgent
from edge_agent.local_cloud import LocalCloud
from edgesplit.bundle import Bundle
from edgesplit.graph import partition
from edgesplit.runtime import SegmentRunner

MODEL = Path(__file__).resolve().parents[2] / "models" / "gpt_decoder.onnx"


def next_token(logits: np.ndarray) -> np.ndarray:
    """Greedy: the most likely token after the last position, as the next step's input_ids [1, 1]."""
    return logits[:, -1:].argmax(-1).astype(np.int64)


def generate_split(agent: EdgeAgent, prompt: np.ndarray, tokens: int):
    """Step a session: the device runs layers 0-1 with their cache, the cloud layers 2-3 with theirs."""
    ids, out, where, up = prompt, [], [], 0
    with agent.session() as session:
        for _ in range(tokens):
            r = session.step({"input_ids": ids})  # the cache is left out: each side keeps its own
            ids = next_token(r["logits"])
            out.append(int(ids[0, 0]))
            where.append(r.where)
    stats = agent.link_stats()
    return out, where, stats


def generate_unsplit(bundle: Bundle, prompt: np.ndarray, tokens: int) -> list[int]:
    """The reference: every segment on this machine, the whole cache fed back each step."""
    seg = SegmentRunner(bundle, "ort-cpu")
    n = bundle.num_segments
    state = {st.input: st.initial({"batch": 1}) for st in bundle.state_of(0, n)}
    ids, out = prompt, []
    for _ in range(tokens):
        outs, state = seg.step({"input_ids": ids}, 0, n, state)
        ids = next_token(outs["logits"])
        out.append(int(ids[0, 0]))
    seg.close()
    return out


def text(tokens: list[int]) -> str:
    """The decoder's vocabulary is bytes; its random weights say nothing in particular."""
    return bytes(tokens).decode("latin-1").encode("unicode_escape").decode()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64, help="tokens to generate (default 64)")
    ap.add_argument("--prompt", default="Hello, edge", help="the prompt (bytes are tokens)")
    ap.add_argument("--server", help="a running cloud server (default: start one on loopback)")
    ap.add_argument("--bundle", help="the partitioned decoder (default: partition models/gpt_decoder.onnx)")
    args = ap.parse_args(argv)
    if args.tokens < 1 or not args.prompt:
        ap.error("--tokens must be >= 1 and --prompt non-empty")
    prompt = np.array([list(args.prompt.encode())], np.int64)
    with contextlib.ExitStack() as stack:
        if args.bundle:
            bundle = Bundle.load(args.bundle)
        else:
            repo = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "repo"
            # the cut is the input of layer 2; present.* -> past_key_values.* pairs are found by name
            bundle = partition(MODEL, [["h.2.input"]], repo / "gpt", shapes={"input_ids": [1, 1]})
        address = args.server or stack.enter_context(LocalCloud(bundle.path.parent, threads=1)).address
        # "raw" is lossless: the tail sees the head's activations bit for bit, so the tokens are exact
        agent = stack.enter_context(EdgeAgent(bundle, [address], cut=1, codec="raw",
                                              config=AgentConfig(connect_timeout_ms=30_000)))
        t = time.perf_counter()
        split, where, stats = generate_split(agent, prompt, args.tokens)
        took = time.perf_counter() - t
        same = split == generate_unsplit(bundle, prompt, args.tokens)
    print(f"prompt {args.prompt!r} -> '{text(split)}'")
    print(f"{args.tokens} tokens through edge + cloud in {took:.2f} s ({took / args.tokens * 1e3:.1f} ms a token): "
          f"{where.count('cloud')} tails in the cloud, {where.count('local')} on the device; "
          f"equal to the unsplit model: {same}")
    print(f"counters: {stats.counters}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
