"""What the agent accepts: the caller's feeds and a server's replies, checked against the bundle first.

A reply is untrusted input like any other: it may answer only a request that is still waiting
and that went to the very server answering, and its tensors must have the bundle's output
names, dtypes and shapes (with the batch size of the request) before the caller sees them.
"""

from __future__ import annotations

import time
from typing import Callable, Mapping

import numpy as np

from edgesplit import codecs, protocol
from edgesplit.bundle import Bundle, TensorSpec
from edgesplit.errors import UserError

__all__ = ["bind_shapes", "ReplyCheck"]

# The parts of a server's own time that its reply reports (milliseconds).
SERVER_PHASES = ("queue_ms", "decode_ms", "compute_ms", "encode_ms")


def bind_shapes(specs: tuple[TensorSpec, ...], arrays: Mapping[str, np.ndarray], what: str,
                bound: dict[str, int] | None = None) -> dict[str, int]:
    """Check names, dtypes and shapes of `arrays` against `specs`; return the symbolic dims bound.

    Symbolic dims (strings) match any non-negative size, but the same name must have the same
    size everywhere, including in `bound` (dims fixed by an earlier check, e.g. the batch size
    from the inputs when checking the outputs). Raises UserError with a readable message.
    """
    bound = dict(bound or {})
    names = [s.name for s in specs]
    if set(arrays) != set(names):
        missing = sorted(set(names) - set(arrays))
        extra = sorted(set(arrays) - set(names))
        raise UserError(f"{what}: expected tensors {names}" + (f", missing {missing}" if missing else "")
                        + (f", unexpected {extra}" if extra else ""))
    for s in specs:
        a = arrays[s.name]
        if not isinstance(a, np.ndarray):
            raise UserError(f"{what}: {s.name} is a {type(a).__name__}, not a numpy array")
        if a.dtype != np.dtype(s.dtype):
            raise UserError(f"{what}: {s.name} has dtype {a.dtype}, expected {s.dtype}")
        if a.ndim != len(s.shape):
            raise UserError(f"{what}: {s.name} has shape {a.shape}, expected {tuple(s.shape)}")
        for size, d in zip(a.shape, s.shape):
            if isinstance(d, int) and d >= 0:
                if size != d:
                    raise UserError(f"{what}: {s.name} has shape {a.shape}, expected {tuple(s.shape)}")
            else:
                key = str(d)
                if bound.setdefault(key, size) != size:
                    raise UserError(f"{what}: {s.name} has shape {a.shape}, but dim {key!r} "
                                    f"is {bound[key]} elsewhere")
    return bound


class ReplyCheck:
    """Decides whether a reply may answer a request, and decodes its outputs once it may.

    Args:
        bundle: the bundle whose outputs a reply must carry.
        is_ours: whether a request id was made by this agent (a late answer, not a stray one).
    """

    def __init__(self, bundle: Bundle, is_ours: Callable[[str], bool], limits: protocol.Limits = protocol.Limits()):
        self.bundle = bundle
        self._is_ours = is_ours
        self._limits = limits

    def misfit(self, rid, req, server_index: int) -> str | None:
        """None if the reply belongs to `req`; else "ignore", "late", or why to ban its server.

        Args:
            rid: the reply's request id.
            req: the pending request of that id, or None.
            server_index: the server that sent the reply.
        """
        if req is None:
            if isinstance(rid, str) and rid.startswith("h"):
                return "ignore"  # an error answer to hello: a server without the handshake
            if isinstance(rid, str) and self._is_ours(rid):
                return "late"  # the agent gave up on it already and answered it otherwise
            return f"reply for unknown request id {rid!r}"
        if server_index not in req.sent_to:
            return f"reply for request {rid}, which was never sent to it"
        return None

    def outputs(self, msg: protocol.Message, binding: dict[str, int]) -> tuple[dict[str, np.ndarray], float]:
        """The reply's outputs, decoded and checked; and the ms that took.

        Raises ProtocolError, CodecError or UserError for a reply that must not be used.
        """
        # The declared names, dtypes and shapes first, with the request's own dims bound: nothing
        # is decompressed for a reply that could not answer it (a bomb, or an oversized batch).
        protocol.check_tensors(msg, self.bundle.outputs, bound=binding, max_bytes=self._limits.max_decoded_bytes)
        t = time.perf_counter()
        outs = {name: codecs.decode(enc) for name, enc in msg.tensors.items()}
        bind_shapes(self.bundle.outputs, outs, f"reply to {msg.id}", bound=binding)
        return outs, (time.perf_counter() - t) * 1e3

    @staticmethod
    def server_ms(msg: protocol.Message) -> dict[str, float]:
        """The server's own time by phase, as its reply reports it (0 for what it leaves out)."""
        st = msg.meta.get("timings") if isinstance(msg.meta.get("timings"), dict) else {}
        return {k: float(st.get(k) or 0.0) for k in SERVER_PHASES}
