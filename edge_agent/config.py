"""AgentConfig: every timeout, heartbeat, retry, backoff and fallback setting of the edge agent."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from edgesplit.errors import ConfigError
from edgesplit.planning import ChooserConfig
from edgesplit.protocol import Limits

__all__ = ["AgentConfig", "FALLBACK_POLICIES"]

# "local": finish on the device; "error": raise LinkDownError / DeadlineExceeded / RemoteError;
# "wait": hold the request until a server is back (or its deadline passes, then DeadlineExceeded).
FALLBACK_POLICIES = ("local", "error", "wait")


@dataclass(frozen=True)
class AgentConfig:
    """Settings of one EdgeAgent. Validated on construction (raises ConfigError).

    All durations are milliseconds. The defaults suit a LAN or loopback; on a cellular link
    raise ``deadline_ms`` and ``heartbeat_interval_ms``.
    """

    # --- requests ---------------------------------------------------------------------------
    # Budget of one request from submit to answer, unless the call passes its own deadline_ms.
    deadline_ms: float = 2000.0
    # What to do when no server is live or the cloud misses the deadline: see FALLBACK_POLICIES.
    fallback: str = "local"
    # Under "local", the agent stops waiting for the cloud this long (plus the profiled local
    # tail time) before the deadline, so the local answer still lands in time.
    fallback_margin_ms: float = 2.0
    # Frames that may be in flight at once (head running, on the wire, or in the cloud);
    # submit() blocks when this many are pending. This is what pipelines a camera loop.
    max_in_flight: int = 8
    # How many times a request is resent to another live server after a failed hop
    # (server died, bad reply, retryable error) before it is finished locally.
    max_resends: int = 2
    # How many times one session step rebuilds the cloud's state (replays the session's earlier
    # steps to a worker that lost or lacks them, `session_state`) before it finishes on the device.
    session_rebuilds: int = 2
    # Bytes of history one session keeps for those rebuilds (its steps' feeds and cut tensors).
    # Past it the history is dropped (logged once): the session goes on, but a lost worker or
    # link can no longer be recovered from, and such a step raises SessionLostError instead.
    session_history_bytes: int = 256 << 20
    # Codec the cloud should use for the outputs it sends back.
    reply_codec: str = "raw"
    # Largest batch (leading dim) a request may send to the cloud (as ServerConfig's); a bigger one is finished as
    # the fallback policy says. It sizes the largest reply the agent accepts: ZMQ_MAXMSGSIZE of
    # its sockets is the bundle's outputs at this batch (edgesplit.protocol.max_frame_bytes), and
    # libzmq drops a server's connection that sends a bigger frame, before buffering it.
    max_request_batch: int = 32768
    # What a server's message may hold (sizes, counts, nesting), checked before any allocation;
    # a reply's declared shapes must also match the request before anything is decompressed.
    limits: Limits = field(default_factory=Limits)

    # --- link monitor -----------------------------------------------------------------------
    # Application heartbeat: a ping to every server this often; the pong carries the server load.
    heartbeat_interval_ms: float = 200.0
    # A server is never declared down before this many intervals of silence (the check fires
    # 5 % early to absorb scheduling latency). Past that, an adaptive failure detector judges
    # (edgesplit.liveness, phi accrual): any message on either connection is life, and the
    # limit grows when pongs come late (a loaded box, a backlog on a slow link) or a request is
    # still leaving at the estimated bandwidth. Pings travel on their own connection, so a big
    # request does not hold them back. A closed TCP connection (a killed server) is seen at
    # once through the socket monitor.
    heartbeat_misses: int = 2
    # The detector's phi threshold: down when the silence is less likely than 10^-this for
    # the gaps seen on this connection (8: Akka's and Cassandra's default).
    liveness_threshold: float = 8.0
    # Floor on the gaps' standard deviation (a quiet machine's jitter): on a quiet machine a
    # silent server is down after max(heartbeat_misses intervals, interval + 5.6 * this): 0.48 s
    # by default. Generous, because a killed server is seen at once anyway (its TCP closes):
    # the limit only matters for a blackhole, where a loaded box's 400 ms stall must not count.
    liveness_min_std_ms: float = 50.0
    # However late the pongs came before, a server silent this long is down.
    liveness_max_silence_ms: float = 5000.0
    # libzmq's own heartbeat (ZMQ_HEARTBEAT_IVL = heartbeat_interval_ms): it closes a
    # connection that received nothing for zmq_heartbeat_timeout_ms (ZMQ_HEARTBEAT_TIMEOUT).
    # Longer than the application's limit on purpose: on the request connection libzmq's pongs
    # wait behind a big request on a slow link, and it would cut a healthy link mid-transfer.
    zmq_heartbeat_timeout_ms: float = 10000.0
    # ZMQ_HEARTBEAT_TTL sent to the server: it drops our connection after this much silence.
    heartbeat_ttl_ms: float = 10000.0
    # A reconnect attempt (a fresh socket that sends hello + ping) waits this long for the answer.
    probe_timeout_ms: float = 400.0
    # Reconnect backoff after a failed attempt: initial, multiplied each time, capped, +/- jitter.
    reconnect_initial_ms: float = 50.0
    reconnect_multiplier: float = 2.0
    reconnect_max_ms: float = 1000.0
    # Fraction of random jitter added to each backoff delay (0.2 = +/- 20 %).
    reconnect_jitter: float = 0.2
    # A server that sent a bad reply (garbage, wrong id, wrong shapes) gets no requests for this
    # long; doubled for each further bad reply, reset by a good one.
    ban_initial_ms: float = 500.0
    ban_max_ms: float = 30000.0
    # The constructor waits this long for a first live server (0: do not wait).
    connect_timeout_ms: float = 2000.0
    # close() lets requests in flight finish for this long, then fails the rest.
    close_timeout_ms: float = 5000.0
    # libzmq send high-water mark per server socket (messages).
    send_hwm: int = 1000

    # --- estimates and the automatic cut ----------------------------------------------------
    # Weight of a new sample in the RTT and bandwidth EWMAs.
    ewma_alpha: float = 0.2
    # Exchanges whose transfer (network time minus RTT) is shorter than this give no bandwidth
    # sample, only a lower bound: on loopback they measure scheduling noise, not the link.
    min_transfer_ms: float = 2.0
    # How eager cut="auto" is to move (edgesplit.planning.CutChooser): another cut must be
    # predicted cheaper by chooser.margin on chooser.patience consecutive requests, so noise
    # never flaps it; chooser.assumed_bandwidth_bps prices the cuts until traffic has measured
    # the link. Its comments are in edgesplit/planning/choose.py.
    chooser: ChooserConfig = field(default_factory=ChooserConfig)
    # When cut="auto" chose to run everything locally, every Nth request still goes to the
    # cloud so the bandwidth estimate stays fresh.
    auto_probe_every: int = 20
    # Cloud segment time = edge segment time / this, when the server reports no profile.
    cloud_speedup: float = 1.0

    # --- device -----------------------------------------------------------------------------
    # Timed runs of every segment at start (after one warm-up run); 0 skips warm-up and profile.
    profile_runs: int = 3
    # The first request of an input shape not profiled yet is profiled again with its own
    # inputs (profile_runs passes: segment times, cut bytes after the codec), and its cut is
    # chosen with those; up to this many shapes are kept (then the nearest in size stands in).
    # 0: only the start-up profile (every symbolic dim set to 1), scaled by the batch.
    shape_profiles: int = 8
    # ONNX Runtime intra-op threads for the device's segments (None: its default).
    intra_op_threads: int | None = None
    # Threads that run local fallbacks (tails finished on the device).
    local_workers: int = 1
    # Emulate a device this many times slower than this machine (benchmarks): every device
    # segment takes this many times its fastest time here, the rest slept. 1: the real device.
    edge_slowdown: float = 1.0

    # --- observability ----------------------------------------------------------------------
    # OpenTelemetry spans per request (head, encode, uplink), their W3C traceparent sent to the
    # server (pip install 'edgesplit[otel]'; the application installs the TracerProvider).
    tracing: bool = False

    # --- security ---------------------------------------------------------------------------
    # CURVE: the server's public key, and this agent's key pair (Z85 text, 40 characters each).
    # All three set: encrypted and authenticated; none set: plain TCP.
    curve_server_key: str | None = None
    curve_public_key: str | None = None
    curve_secret_key: str | None = None

    def __post_init__(self) -> None:
        def positive(name: str, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
                raise ConfigError(f"AgentConfig.{name} must be a number, got {v!r}")
            if v < 0 or (v == 0 and not allow_zero):
                raise ConfigError(f"AgentConfig.{name} must be {'>= 0' if allow_zero else '> 0'}, got {v!r}")

        for name in ("deadline_ms", "heartbeat_interval_ms", "heartbeat_ttl_ms", "zmq_heartbeat_timeout_ms",
                     "probe_timeout_ms",
                     "reconnect_initial_ms", "reconnect_max_ms", "ban_initial_ms", "ban_max_ms",
                     "cloud_speedup", "edge_slowdown", "liveness_threshold", "liveness_min_std_ms",
                     "liveness_max_silence_ms"):
            positive(name)
        for name in ("fallback_margin_ms", "connect_timeout_ms", "close_timeout_ms", "min_transfer_ms",
                     "reconnect_jitter"):
            positive(name, allow_zero=True)
        for name in ("max_in_flight", "heartbeat_misses", "send_hwm", "auto_probe_every", "local_workers",
                     "max_resends", "profile_runs", "max_request_batch", "session_rebuilds", "session_history_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"AgentConfig.{name} must be an integer, got {v!r}")
        for name in ("max_in_flight", "heartbeat_misses", "send_hwm", "auto_probe_every", "local_workers",
                     "max_request_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"AgentConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("max_resends", "profile_runs", "session_history_bytes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"AgentConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if isinstance(self.shape_profiles, bool) or not isinstance(self.shape_profiles, int) or self.shape_profiles < 0:
            raise ConfigError(f"AgentConfig.shape_profiles must be an integer >= 0, got {self.shape_profiles!r}")
        if not isinstance(self.limits, Limits):
            raise ConfigError(f"AgentConfig.limits must be an edgesplit.protocol.Limits, got {type(self.limits).__name__}")
        if not isinstance(self.chooser, ChooserConfig):
            raise ConfigError(f"AgentConfig.chooser must be an edgesplit.planning.ChooserConfig, "
                              f"got {type(self.chooser).__name__}")
        if self.edge_slowdown < 1:
            raise ConfigError(f"AgentConfig.edge_slowdown must be >= 1, got {self.edge_slowdown!r}")
        if self.fallback not in FALLBACK_POLICIES:
            raise ConfigError(f"AgentConfig.fallback must be one of {FALLBACK_POLICIES}, got {self.fallback!r}")
        if self.reconnect_multiplier < 1:
            raise ConfigError(f"AgentConfig.reconnect_multiplier must be >= 1, got {self.reconnect_multiplier!r}")
        if self.reconnect_max_ms < self.reconnect_initial_ms:
            raise ConfigError("AgentConfig.reconnect_max_ms must be >= reconnect_initial_ms")
        if self.ban_max_ms < self.ban_initial_ms:
            raise ConfigError("AgentConfig.ban_max_ms must be >= ban_initial_ms")
        if not 0 < self.ewma_alpha <= 1:
            raise ConfigError(f"AgentConfig.ewma_alpha must be in (0, 1], got {self.ewma_alpha!r}")
        if self.reconnect_jitter >= 1:
            raise ConfigError(f"AgentConfig.reconnect_jitter must be < 1, got {self.reconnect_jitter!r}")
        if self.intra_op_threads is not None and (not isinstance(self.intra_op_threads, int)
                                                  or self.intra_op_threads < 1):
            raise ConfigError(f"AgentConfig.intra_op_threads must be None or >= 1, got {self.intra_op_threads!r}")
        if not isinstance(self.tracing, bool):
            raise ConfigError(f"AgentConfig.tracing must be true or false, got {self.tracing!r}")
        if not isinstance(self.reply_codec, str) or not self.reply_codec:
            raise ConfigError(f"AgentConfig.reply_codec must be a codec spec, got {self.reply_codec!r}")
        keys = (self.curve_server_key, self.curve_public_key, self.curve_secret_key)
        if any(k is not None for k in keys):
            if any(k is None for k in keys):
                raise ConfigError("CURVE needs curve_server_key, curve_public_key and curve_secret_key together")
            for name, k in zip(("curve_server_key", "curve_public_key", "curve_secret_key"), keys):
                if not isinstance(k, (str, bytes)) or len(k) != 40:
                    raise ConfigError(f"AgentConfig.{name} must be a 40-character Z85 key")

    def with_curve(self, server_key_file: str | os.PathLike, client_key_file: str | os.PathLike) -> "AgentConfig":
        """A copy that uses CURVE, keys read from ZeroMQ certificate files.

        Args:
            server_key_file: the server's public certificate (``server.key``).
            client_key_file: this agent's secret certificate (``agent.key_secret``), as written by
                ``edgesplit keys generate`` or ``zmq.auth.create_certificates``.
        """
        import zmq.auth

        try:
            server_public, _ = zmq.auth.load_certificate(os.fspath(server_key_file))
            public, secret = zmq.auth.load_certificate(os.fspath(client_key_file))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read CURVE certificates: {exc}") from exc
        if secret is None:
            raise ConfigError(f"{client_key_file} holds no secret key (use the .key_secret file)")
        return self.replace(curve_server_key=server_public.decode("ascii"), curve_public_key=public.decode("ascii"),
                            curve_secret_key=secret.decode("ascii"))

    def replace(self, **changes) -> "AgentConfig":
        """A copy with some fields changed (validated again)."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ConfigError(f"AgentConfig has no field(s) {sorted(unknown)}")
        return type(self)(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})

    @classmethod
    def from_file(cls, path: str | os.PathLike | None = None, env: "dict[str, str] | None" = None,
                  **overrides) -> "AgentConfig":
        """Settings from the ``[agent]`` table of a TOML file, then ``EDGESPLIT_AGENT_*`` variables,
        then `overrides` (docs/configuration.md lists every field, key and variable).

        Args:
            path: the TOML file, or None for the environment alone.
            env: variables to read (default ``os.environ``; ``{}`` reads none).
        """
        from edgesplit import settings

        return settings.load(cls, path, section="agent", env=env, overrides=overrides)

    @classmethod
    def from_env(cls, env: "dict[str, str] | None" = None, **overrides) -> "AgentConfig":
        """The defaults with ``EDGESPLIT_AGENT_*`` variables applied (then `overrides`)."""
        return cls.from_file(None, env=env, **overrides)
