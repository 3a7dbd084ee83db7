"""ServerConfig: every timeout, heartbeat, queue and batching setting of the cloud pool in one place."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Iterable

from edgesplit.errors import ConfigError, EdgeSplitError
from edgesplit.liveness import FailureDetector
from edgesplit.protocol import Limits, max_frame_bytes

__all__ = ["ServerConfig"]


@dataclass(frozen=True)
class ServerConfig:
    """Settings of a broker and its tail workers. Validated on construction (raises ConfigError).

    Durations are seconds (``*_s``) or milliseconds (``*_ms``) as the name says. The defaults
    suit a LAN; tests shorten the heartbeat to see a lost worker sooner.
    """

    # --- broker <-> worker liveness (Paranoid Pirate) ---------------------------------------
    # Broker and workers each send a heartbeat this often when they have nothing else to say.
    heartbeat_interval_s: float = 0.5
    # Heartbeat intervals the broker waits for its workers' goodbyes on a graceful stop. (It
    # was the fixed liveness rule; silence is now judged by the detector below.)
    heartbeat_liveness: int = 3
    # The adaptive failure detector (edgesplit.liveness, phi accrual) each side runs on the
    # other: any message is life; a peer is dead when its silence is less likely than
    # 10^-liveness_threshold for the gaps seen so far (8: Akka's and Cassandra's default).
    liveness_threshold: float = 8.0
    # Floor on the gaps' standard deviation (a quiet machine's jitter): on a quiet machine a
    # dead peer is found after about heartbeat_interval_s + 5.6 * this (0.78 s by default;
    # 25 ms gave false losses of live thread workers on a box at load 30, as on the agent side).
    liveness_min_std_s: float = 0.05
    # Bounds on that limit: never dead sooner than min (whatever the history), always dead
    # after max (however late the heartbeats came on a loaded box).
    liveness_min_silence_s: float = 0.2
    liveness_max_silence_s: float = 5.0
    # Gaps (heartbeat to heartbeat) the statistics remember: a loaded machine raises the limit
    # within a few late heartbeats, and it takes this many calm ones to lower it again.
    liveness_window: int = 100
    # A worker that lost its broker waits this long before reconnecting, doubling up to the max.
    reconnect_initial_s: float = 0.25
    reconnect_max_s: float = 8.0

    # --- dispatch and backpressure ----------------------------------------------------------
    # Requests in flight at one worker at once (queued there or computing). Enough to fill a
    # batch while the previous one computes; beyond it requests wait in the broker.
    worker_capacity: int = 16
    # Requests the broker holds while every worker is at capacity. When this is full a new
    # request gets an immediate "busy" error with retry_after_ms instead of more memory.
    max_pending: int = 256
    # Bytes of requests the broker may hold at once (waiting, or in flight and kept for a
    # re-dispatch); beyond it new requests get "busy" too. Bounds memory whatever the sizes.
    max_held_bytes: int = 2 << 30
    # Smallest retry_after_ms hint sent with "busy" (the estimate from the queue can be lower).
    min_retry_after_ms: float = 5.0
    # Dispatches of one request: after a worker is lost its requests are sent to another
    # worker, at most this many times in all, then answered with "worker_lost".
    max_attempts: int = 3
    # Budget for a request that carries no deadline_ms, so nothing waits forever.
    default_deadline_ms: float = 30_000.0
    # A request still unanswered this long after its deadline (a worker alive but stuck) is
    # answered with "deadline" by the broker; a late answer from the worker is then dropped.
    deadline_grace_ms: float = 1_000.0
    # How often the broker looks for new bundles in its repository when asked for an unknown id.
    rescan_interval_s: float = 2.0

    # --- dynamic batching (in each worker) --------------------------------------------------
    # Requests for the same bundle and cut that arrive within this window run as one batch.
    max_queue_delay_ms: float = 2.0
    # Largest batch (samples along the dynamic batch dim) a worker runs at once.
    max_batch: int = 8
    # Largest batch (leading dim) one request may carry. Checked, with the raw bytes it implies,
    # before anything is decompressed ("bad_request" beyond it), and it sizes ZMQ_MAXMSGSIZE
    # (socket_bound). A request above max_batch but within this runs alone.
    max_request_batch: int = 32768
    # After a batch of several requests, a worker waits up to max_queue_delay_ms for batch-mates
    # of that bundle and cut for this long (a lone client never waits for a request that can
    # only come after its answer).
    batch_crowd_memory_s: float = 1.0

    # --- bundles that travel (cloud_server.fetch) -------------------------------------------
    # Largest bundle (manifest + segment files) a worker fetches from its broker when asked for
    # one it does not hold; 0: never fetch (a missing bundle is "unknown_bundle"). A worker that
    # may fetch reads its broker's frames up to limits.max_message_bytes (the broker's edge-facing
    # socket bounds them by its own bundles already).
    fetch_max_bytes: int = 16 << 30
    # A fetch travels in chunks of this many bytes, a few in flight at once.
    fetch_chunk_bytes: int = 1 << 20
    # A fetch that gets no chunk for this long fails (its waiting requests get "unknown_bundle").
    fetch_timeout_s: float = 30.0

    # --- stateful sessions (in each worker) -------------------------------------------------
    # A session whose worker has not seen a step for this long is dropped (its edge then
    # replays the steps to rebuild it, or finishes on the device).
    session_idle_s: float = 600.0
    # Bytes of session state (recurrent states, KV caches) one worker holds at most; past it
    # the least recently used sessions are evicted (logged, edgesplit_sessions_evicted_total).
    session_memory_bytes: int = 1 << 30

    # --- pipeline stages: a tail over several workers (cloud_server.placement) --------------
    # Bytes of segment weights one worker may hold (0: no limit; `--worker-memory 40MB`). A
    # bundle that fits no worker whole is served as a chain of stages, each within the budget
    # of the worker that holds it; a worker never loads past its budget.
    worker_memory_bytes: int = 0
    # Split every bundle into at least this many stages on separate workers (0 or 1: only as
    # many as the memory budget needs). More stages pipeline more requests at once, at one more
    # broker hop each (docs/pipeline.md).
    pipeline_stages: int = 0
    # Codec of the tensors one stage hands the next (through the broker). Lossless by default:
    # a staged answer is then the unsplit model's (the hop stays inside the data centre).
    stage_codec: str = "raw"

    # --- execution --------------------------------------------------------------------------
    # Runner kind for the tail segments ("auto", "ort-cpu", "ort-cuda", "ort-trt", "trt").
    runner: str = "auto"
    # ONNX Runtime intra-op threads per worker (None: cores / CPU workers, at least 1).
    intra_op_threads: int | None = None
    # Workers load every bundle of their repository at start (so the first request is fast,
    # /readyz means "can serve", and the per-segment profile is known); else on first use.
    preload: bool = True
    # Time every segment once when a bundle is loaded, for the profile sent in "welcome".
    profile_on_load: bool = True

    # --- life cycle -------------------------------------------------------------------------
    # On SIGTERM the server stops taking requests and waits at most this long for those in flight.
    drain_timeout_s: float = 30.0
    # `serve` waits this long for its local workers' first announcements before "ready".
    startup_timeout_s: float = 120.0
    # A local worker process that died is started again after this delay (0: never restart).
    restart_delay_s: float = 1.0

    # --- untrusted input --------------------------------------------------------------------
    # What one message from an edge may hold (checked before anything is allocated). Every
    # socket that reads network data also gets ZMQ_MAXMSGSIZE from these and the bundles' cut
    # specs at max_request_batch (see socket_bound): libzmq drops a peer that sends a bigger frame.
    limits: Limits = field(default_factory=Limits)
    # Accept float inputs holding NaN or infinity (False: refused with "bad_request" and counted
    # in edgesplit_refused_requests{reason="non_finite"}; they would poison a whole batch).
    allow_non_finite: bool = False

    # --- observability ----------------------------------------------------------------------
    # OpenTelemetry spans of each request that carries a traceparent: the broker's queue, the
    # worker's decode / compute / encode (pip install 'edgesplit[otel]'; the process installs the
    # TracerProvider: an OTLP exporter configured by OTEL_* variables, or a test's in-memory one).
    tracing: bool = False

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("limits", "runner", "intra_op_threads", "preload", "profile_on_load", "allow_non_finite",
                          "tracing", "stage_codec"):
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"ServerConfig.{f.name} must be a non-negative number, got {v!r}")
        for name in ("heartbeat_interval_s", "worker_capacity", "max_batch", "max_request_batch", "max_attempts",
                     "heartbeat_liveness", "default_deadline_ms", "reconnect_initial_s", "liveness_threshold",
                     "liveness_min_std_s", "liveness_max_silence_s", "session_idle_s", "fetch_chunk_bytes",
                     "fetch_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"ServerConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("worker_capacity", "max_batch", "max_request_batch", "max_attempts", "heartbeat_liveness",
                     "max_pending",
                     "max_held_bytes", "liveness_window", "session_memory_bytes", "fetch_max_bytes",
                     "fetch_chunk_bytes", "worker_memory_bytes", "pipeline_stages"):
            if not isinstance(getattr(self, name), int):
                raise ConfigError(f"ServerConfig.{name} must be an int, got {getattr(self, name)!r}")
        if self.liveness_window < 2:
            raise ConfigError(f"ServerConfig.liveness_window must be >= 2, got {self.liveness_window!r}")
        if self.liveness_max_silence_s < max(self.liveness_min_silence_s, self.heartbeat_interval_s):
            raise ConfigError("ServerConfig.liveness_max_silence_s must be >= liveness_min_silence_s and "
                              "heartbeat_interval_s")
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ConfigError("ServerConfig.reconnect_max_s must be >= reconnect_initial_s")
        if self.intra_op_threads is not None and (not isinstance(self.intra_op_threads, int)
                                                  or self.intra_op_threads < 1):
            raise ConfigError(f"ServerConfig.intra_op_threads must be None or >= 1, got {self.intra_op_threads!r}")
        if not isinstance(self.runner, str) or not self.runner:
            raise ConfigError(f"ServerConfig.runner must be a runner kind, got {self.runner!r}")
        if not isinstance(self.limits, Limits):
            raise ConfigError("ServerConfig.limits must be an edgesplit.protocol.Limits")
        if self.fetch_chunk_bytes > self.limits.max_message_bytes // 2:
            raise ConfigError("ServerConfig.fetch_chunk_bytes must be at most half of limits.max_message_bytes")
        if self.pipeline_stages > 64:
            raise ConfigError(f"ServerConfig.pipeline_stages must be at most 64, got {self.pipeline_stages!r}")
        try:
            from edgesplit.codecs import get_codec

            get_codec(self.stage_codec)
        except (EdgeSplitError, ValueError, TypeError) as exc:
            raise ConfigError(f"ServerConfig.stage_codec {self.stage_codec!r} is not a codec: {exc}") from None
        for name in ("preload", "profile_on_load", "allow_non_finite", "tracing"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"ServerConfig.{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def heartbeat_expiry_s(self) -> float:
        """heartbeat_liveness intervals: how long a graceful stop waits for goodbyes."""
        return self.heartbeat_interval_s * self.heartbeat_liveness

    def failure_detector(self, now: float) -> FailureDetector:
        """A fresh detector of one peer (a worker, or the broker), first heard of at `now`."""
        return FailureDetector(self.heartbeat_interval_s, self.liveness_threshold, self.liveness_min_std_s,
                               self.liveness_min_silence_s, self.liveness_max_silence_s, self.liveness_window, now)

    def socket_bound(self, bundles: Iterable) -> int:
        """ZMQ_MAXMSGSIZE for the pool's sockets: the largest legitimate frame any of `bundles`
        (edgesplit.bundle.Bundle) can need, at max_request_batch samples (edgesplit.protocol.max_frame_bytes).

        Every cut counts, inputs and outputs included: requests and replies cross the same sockets.
        """
        specs = [s for b in bundles for k in range(b.num_segments + 1) for s in b.cut(k).specs]
        return max_frame_bytes(specs, self.max_request_batch, self.limits)

    def replace(self, **changes) -> "ServerConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    # The settings a worker process needs travel on its command line as JSON (limits too: the
    # worker checks every request against them, and a config file may have changed them).
    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["limits"] = asdict(self.limits)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ServerConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown ServerConfig fields: {sorted(unknown)}")
        d = dict(d)
        if isinstance(d.get("limits"), dict):
            try:
                d["limits"] = Limits(**d["limits"])
            except TypeError as exc:
                raise ConfigError(f"ServerConfig.limits: {exc}") from None
        return cls(**d)
