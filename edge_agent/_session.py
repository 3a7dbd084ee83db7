"""Stateful sessions: the steps of one sequence (a decoder's tokens, a recurrent model's frames), split.

Each side keeps the state of its own segments and never ships it: the device steps the head
[0, k) with its state, the cloud worker that holds the session steps the tail [k, n) with its
own (cloud_server/sessions.py). The session keeps the history of what it sent for each step,
the cut tensors encoded as they went and decoded as the cloud decoded them, so that

* a worker that holds nothing or is behind (`session_state`, meta `have`: the step it can
  continue from; a lost worker's replacement says 0) is brought back by replaying steps
  have.. from the history, then the step goes on (not a restart from 0: the tokens stay the
  unsplit model's);
* when the cloud cannot answer (the link is lost, the deadline passed, the replays failed)
  the step is finished on the device: the tail's state is rebuilt here by stepping the tail
  over the history, and the session stays on the device for the rest of its steps (it does
  not go back to the cloud: that would mean one more replay, for nothing the device cannot do).

Every step is answered exactly once: `step` returns one StepResult or raises.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

import numpy as np

from edgesplit import codecs
from edgesplit import protocol
from edgesplit.errors import (DeadlineExceeded, EdgeSplitError, LinkDownError, RemoteError, SessionLostError,
                              TransportError, UserError)

from edge_agent._checks import bind_shapes
from edge_agent._results import InferenceResult

if TYPE_CHECKING:  # pragma: no cover
    from edge_agent.agent import EdgeAgent

__all__ = ["Session", "StepResult"]

log = logging.getLogger(__name__)

_tokens: "weakref.WeakKeyDictionary[object, str]" = weakref.WeakKeyDictionary()
_tokens_lock = threading.Lock()


def client_token(agent: object) -> str:
    """The agent's random client token (32 hex chars): a worker lets only it step its sessions."""
    with _tokens_lock:
        tok = _tokens.get(agent)
        if tok is None:
            tok = _tokens[agent] = secrets.token_hex(16)
        return tok


@dataclass(frozen=True)
class StepResult(InferenceResult):
    """One session step's answer: an InferenceResult plus where the session stands.

    Attributes:
        step: the step's index in its session (0 first).
        replayed: earlier steps sent again to rebuild the cloud's state for this one.
    """

    step: int = 0
    replayed: int = 0


class _Sent:
    __slots__ = ("feeds", "encoded", "decoded", "nbytes", "held")

    def __init__(self, feeds, encoded, decoded):
        self.feeds = feeds
        self.encoded = encoded
        self.decoded = decoded
        self.nbytes = sum(e.nbytes for e in encoded.values())  # what a replay sends again
        self.held = self.nbytes + sum(a.nbytes for d in (feeds, decoded) for a in d.values())


class Session:
    """One stateful sequence through an EdgeAgent (`agent.session()`); use as a context manager.

    Args:
        agent: the EdgeAgent whose device, link and settings it uses.
        cut: the cut to pin (default: the agent's fixed cut, or what cut="auto" picks for the
            first step's inputs); it stays for the whole session.
        deadline_ms: each step's budget (default AgentConfig.deadline_ms).
    """

    def __init__(self, agent: "EdgeAgent", cut: int | None = None, deadline_ms: float | None = None):
        n = agent.bundle.num_segments
        if cut is not None and (isinstance(cut, bool) or not isinstance(cut, int) or not 0 <= cut <= n):
            raise UserError(f"a session's cut is an integer in 0..{n}, got {cut!r}")
        self._agent = agent
        self.id = secrets.token_hex(16)
        self._client = client_token(agent)
        self.cut: int | None = cut if cut is not None else (None if agent.cut == "auto" else agent.cut)
        self.deadline_ms = deadline_ms
        self.steps = 0
        self.local_reason: str | None = None  # set once the session moved to the device
        self._head_state: dict[str, np.ndarray] | None = None
        self._tail_state: dict[str, np.ndarray] | None = None  # only once local
        self._history: list[_Sent] = []  # steps _base.. (earlier ones dropped past session_history_bytes)
        self._base = 0
        self._held = 0
        self._lock = threading.Lock()  # one step at a time
        self._closed = False
        self._used_cloud = False
        self._server: int | None = None  # the index of the server that answered last: the next steps go there

    # -- public -------------------------------------------------------------------------------
    @property
    def where(self) -> str:
        """Where the tail runs now: "cloud" or "local"."""
        return "local" if self.local_reason is not None else "cloud"

    @property
    def bytes_kept(self) -> int:
        """Bytes the history holds for rebuilds (feeds, and cut tensors as sent and as decoded)."""
        return self._held

    @property
    def recoverable(self) -> bool:
        """The history reaches back to step 0: a lost worker or link can still be recovered from."""
        return self._base == 0

    def step(self, feeds: Mapping[str, np.ndarray], deadline_ms: float | None = None) -> StepResult:
        """Run one step on `feeds` (the model inputs, state left out); the next step continues from it."""
        with self._lock:
            if self._closed:
                raise EdgeSplitError(f"session {self.id[:8]} is closed")
            return self._step(feeds, deadline_ms if deadline_ms is not None else self.deadline_ms)

    async def step_async(self, feeds: Mapping[str, np.ndarray], deadline_ms: float | None = None) -> StepResult:
        """The asyncio face of step(): same arguments, same answer (the step runs in a thread)."""
        feeds = {k: np.array(v, copy=True) for k, v in feeds.items()}
        return await asyncio.get_running_loop().run_in_executor(None, self.step, feeds, deadline_ms)

    def close(self) -> None:
        """End the session: the cloud may drop its state now (it would expire anyway)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._history.clear()
            self._held = 0
            agent = self._agent
            if self._used_cloud and agent._io.alive:
                agent._io.post(("notify", protocol.session_end(f"end-{self.id[:8]}", self.id, self._client)))

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Session({self.id[:8]}..., cut={self.cut}, steps={self.steps}, where={self.where!r})"

    # -- one step -----------------------------------------------------------------------------
    def _step(self, feeds, deadline_ms) -> StepResult:
        agent = self._agent
        bundle, device, cfg = agent.bundle, agent._device, agent.config
        n = bundle.num_segments
        t0 = time.perf_counter()
        if not isinstance(feeds, Mapping):
            raise UserError(f"feeds must be a dict of name -> numpy array, got {type(feeds).__name__}")
        binding = bind_shapes(bundle.inputs, feeds, f"{bundle.name} inputs")
        if deadline_ms is None:
            deadline_ms = cfg.deadline_ms
        elif isinstance(deadline_ms, bool) or not isinstance(deadline_ms, (int, float)) or not deadline_ms > 0:
            raise UserError(f"deadline_ms must be a positive number, got {deadline_ms!r}")
        deadline = t0 + deadline_ms / 1e3
        if self.cut is None:
            # a new shape's profile runs segments without their state: a stateful bundle is priced
            # with the start-up profile (taken at its first step)
            plan, factor = agent._auto.plan_for(feeds) if not bundle.state else (agent._auto.last, 1.0)
            self.cut = agent._auto.choose(plan, factor, agent._io.eligible, agent._io.least_wait_ms(), deadline_ms)
        k = self.cut
        if self._head_state is None:
            self._head_state = {st.input: st.initial(binding) for st in bundle.state_of(0, k)}
        t = time.perf_counter()
        mid, self._head_state = device.step(feeds, 0, k, self._head_state)
        timings = {"head": (time.perf_counter() - t) * 1e3, "encode": 0.0, "network": 0.0, "tail": 0.0}
        i = self.steps
        self.steps += 1
        if k == n:  # all on the device: the head's tensors at cut n are the outputs
            self.local_reason = self.local_reason or "chosen"
            return self._done(StepResult(mid, "local", k, timings, None, "chosen", step=i), t0)
        t = time.perf_counter()
        enc = {name: agent._encode(name, a) for name, a in mid.items()}
        # kept as sent (for replays) and as the cloud decodes it (for a rebuild here): exact replays
        sent = _Sent({name: np.array(a, copy=True) for name, a in feeds.items()}, enc,
                     {name: codecs.decode(e) for name, e in enc.items()})
        timings["encode"] = (time.perf_counter() - t) * 1e3
        self._keep(i, sent)
        if self.local_reason is None:
            if agent._io.connected():
                try:
                    res, replayed = self._cloud(i, deadline)
                except (TransportError, RemoteError) as exc:
                    if cfg.fallback != "local":
                        raise
                    reason = _reason(exc)
                else:
                    self._used_cloud = True
                    timings.update({key: v for key, v in res.timings.items() if key not in ("head", "encode")})
                    return self._done(StepResult(res.outputs, "cloud", k, timings, res.server, None, step=i,
                                                 replayed=replayed), t0)
            elif cfg.fallback == "local":
                reason = "link down"
            else:
                raise LinkDownError(f"session {self.id[:8]}: no live server")
            self._go_local(i, reason)
        t = time.perf_counter()
        out, self._tail_state = device.step(sent.decoded, k, n, self._tail_state)
        timings["tail"] = (time.perf_counter() - t) * 1e3
        return self._done(StepResult(out, "local", k, timings, None, self.local_reason, step=i), t0)

    def _keep(self, i: int, sent: _Sent) -> None:
        """Add step i to the history, within AgentConfig.session_history_bytes (past it: only step i)."""
        self._history.append(sent)
        self._held += sent.held
        limit = self._agent.config.session_history_bytes
        # on the device for good, nothing will be replayed; past the bound, nothing can be
        if self.local_reason is not None or self._held > limit:
            if self.local_reason is None and self._base == 0:
                log.warning("session %s: its history passed session_history_bytes (%d bytes) at step %d and is "
                            "dropped: a lost worker or link can no longer be recovered from", self.id[:8], limit, i)
            self._history, self._base, self._held = [sent], i, sent.held

    def _lost(self, what: str) -> SessionLostError:
        return SessionLostError(f"session {self.id[:8]}: {what}, and its history before step {self._base} was "
                                f"dropped (AgentConfig.session_history_bytes): start a new session")

    def _done(self, res: StepResult, t0: float) -> StepResult:
        res.timings["total"] = (time.perf_counter() - t0) * 1e3
        self._agent._requests.count(f"session_{res.where}")
        return res

    # -- the cloud ----------------------------------------------------------------------------
    def _cloud(self, i: int, deadline: float) -> tuple[InferenceResult, int]:
        """Step i on the session's worker, replaying what it lacks first; (its answer, steps replayed)."""
        first = i
        for _ in range(1 + self._agent.config.session_rebuilds):
            try:
                return self._send_range(first, i, deadline), i - first
            except RemoteError as exc:
                if exc.code != "session_state":
                    raise
                have = (getattr(exc, "meta", None) or {}).get("have", 0)
                # a worker ahead of this step (it ran it, the answer was lost) starts over: step 0 resets
                first = have if type(have) is int and 0 <= have <= i else 0
                if first < self._base:
                    raise self._lost("the cloud lost its state") from None
                self._agent._requests.count("session_rebuilds")
        raise RemoteError("session_state", f"session {self.id[:8]}: the cloud's state could not be rebuilt after "
                                           f"{self._agent.config.session_rebuilds} replays")

    def _send_range(self, first: int, last: int, deadline: float) -> InferenceResult:
        """Send steps first..last as they were sent the first time, pipelined (up to max_in_flight at
        once: the broker and the worker keep a session's steps in order); the answer to `last`.

        Raises what the first failed step failed with (the replays' answers are dropped).
        """
        futures = [self._post(j, deadline) for j in range(first, last + 1)]
        failed = None
        for f in futures:
            try:
                res = f.result()
            except (TransportError, RemoteError) as exc:
                failed = failed or exc
        if failed is not None:
            raise failed
        servers = self._agent.servers
        self._server = servers.index(res.server) if res.server in servers else None
        return res

    def _post(self, j: int, deadline: float):
        agent = self._agent
        left_ms = (deadline - time.perf_counter()) * 1e3
        if left_ms <= 0:
            raise _deadline(f"session {self.id[:8]}: no time left for step {j} in the cloud")
        h = self._history[j - self._base]
        req = agent._requests.admit(h.feeds, left_ms, copy=False, block=True)
        req.cut = self.cut
        req.feeds = req.cut_tensors = None  # no local fallback for this request: the session does its own
        req.encoded = h.encoded
        req.bytes_up = h.nbytes
        req.meta = {"session": self.id, "step": j, "client": self._client}
        req.prefer = self._server
        agent._io.post(("send", req))
        return req.future

    # -- the device ---------------------------------------------------------------------------
    def _go_local(self, i: int, reason: str) -> None:
        """Rebuild the tail's state here from steps 0..i-1 of the history; the session stays local."""
        agent = self._agent
        bundle, device = agent.bundle, agent._device
        k, n = self.cut, bundle.num_segments
        if self._base > 0:
            raise self._lost(f"the cloud could not answer ({reason})")
        bound = protocol.check_tensors(protocol.Message("infer", tensors=self._history[0].encoded),
                                       bundle.cut(k).specs)
        state = {st.input: st.initial(bound) for st in bundle.state_of(k, n)}
        for j in range(i):
            _, state = device.step(self._history[j].decoded, k, n, state)
        self._tail_state = state
        self.local_reason = reason
        agent._requests.count("session_to_local")


def _deadline(message: str) -> TransportError:
    return DeadlineExceeded(message)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, RemoteError):
        return f"server error {exc.code}"
    if isinstance(exc, LinkDownError):
        return "link down"
    return "deadline" if "deadline" in type(exc).__name__.lower() else "link down"
