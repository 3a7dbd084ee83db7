"""edgesplit.settings: TOML tables and EDGESPLIT_* variables onto ServerConfig/AgentConfig (and any frozen
config dataclass), precedence, refusals, bool parsing; `serve/worker --config`; docs/configuration.md up to date."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cloud_server.cli import _config, register_serve, register_worker
from cloud_server.config import ServerConfig
from edge_agent.config import AgentConfig
from edgesplit import settings
from edgesplit.errors import ConfigError
from edgesplit.protocol import Limits

REPO = Path(__file__).resolve().parents[1]


def _toml(tmp_path, text: str, name: str = "edgesplit.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@dataclass(frozen=True)
class Inner:
    # a nested number
    depth: int = 2
    # a nested flag
    strict: bool = False


@dataclass(frozen=True)
class Sample:
    """A config dataclass with every supported kind of field."""

    # a count
    count: int = 1
    # a ratio
    ratio: float = 0.5
    # a switch
    enabled: bool = True
    # a name
    name: str = "x"
    # ports
    ports: tuple[int, ...] = (1, 2)
    # tags
    tags: list[str] = field(default_factory=list)
    # an optional limit
    limit: float | None = None
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self):
        if self.count < 0:
            raise ConfigError(f"Sample.count must be >= 0, got {self.count}")


# --- the mapping ---------------------------------------------------------------------------------


def test_file_values_take_the_field_types(tmp_path):
    f = _toml(tmp_path, """
[server]
heartbeat_interval_s = 1      # an integer for a float field
max_pending = 512
preload = false
runner = "ort-cpu"
intra_op_threads = 3
[server.limits]
max_tensors = 32
[agent]                       # left alone by a ServerConfig load
deadline_ms = 100.0
""")
    cfg = settings.load(ServerConfig, f, section="server", env={})
    assert cfg.heartbeat_interval_s == 1.0 and isinstance(cfg.heartbeat_interval_s, float)
    assert (cfg.max_pending, cfg.preload, cfg.runner, cfg.intra_op_threads) == (512, False, "ort-cpu", 3)
    assert cfg.limits == Limits(max_tensors=32)  # the other limits keep their defaults
    assert cfg.max_batch == ServerConfig().max_batch


def test_every_kind_of_field_from_file_and_env(tmp_path):
    f = _toml(tmp_path, """
[server]
count = 4
ports = [80, 443]
tags = ["a", "b"]
limit = 2
[server.inner]
strict = true
""")
    got = settings.load(Sample, f, section="server", env={})
    assert got == Sample(count=4, ports=(80, 443), tags=["a", "b"], limit=2.0, inner=Inner(strict=True))
    env = {"EDGESPLIT_SERVER_PORTS": "8080, 9090", "EDGESPLIT_SERVER_TAGS": "", "EDGESPLIT_SERVER_LIMIT": "none",
           "EDGESPLIT_SERVER_INNER__DEPTH": "7", "EDGESPLIT_SERVER_NAME": "edge 1", "EDGESPLIT_SERVER_RATIO": "1e-3"}
    got = settings.load(Sample, f, section="server", env=env)
    assert got.ports == (8080, 9090) and got.tags == [] and got.limit is None
    assert got.inner == Inner(depth=7, strict=True) and got.name == "edge 1" and got.ratio == 0.001


def test_precedence_defaults_file_env_flags(tmp_path):
    f = _toml(tmp_path, "[server]\nmax_batch = 2\nmax_pending = 100\nworker_capacity = 5\n")
    env = {"EDGESPLIT_SERVER_MAX_BATCH": "3", "EDGESPLIT_SERVER_MAX_PENDING": "200"}
    cfg = settings.load(ServerConfig, f, section="server", env=env, overrides={"max_batch": 4})
    assert cfg.max_batch == 4  # flag > env > file
    assert cfg.max_pending == 200  # env > file
    assert cfg.worker_capacity == 5  # file > default
    assert cfg.max_attempts == ServerConfig().max_attempts  # default
    assert settings.load(ServerConfig, None, section="server", env=env).max_batch == 3


def test_base_replaces_the_defaults():
    base = ServerConfig(max_batch=5, limits=Limits(max_rank=4))
    cfg = settings.load(ServerConfig, section="server", env={"EDGESPLIT_SERVER_LIMITS__MAX_TENSORS": "9"}, base=base)
    assert cfg.max_batch == 5 and cfg.limits == Limits(max_rank=4, max_tensors=9)


@pytest.mark.parametrize("text, value", [
    ("0", False), ("false", False), ("False", False), ("OFF", False), ("no", False), (" 0 ", False),
    ("1", True), ("true", True), ("TRUE", True), ("on", True), ("yes", True),
])
def test_bool_variables(text, value):
    cfg = settings.load(ServerConfig, section="server", env={"EDGESPLIT_SERVER_PRELOAD": text})
    assert cfg.preload is value


@pytest.mark.parametrize("text", ["", "2", "-1", "enabled", "nope", "0.0"])
def test_bool_variables_refuse_anything_else(text):
    # Polygraphy once turned a flag on when it was set to "0"; here an unclear value is an error.
    with pytest.raises(ConfigError, match="EDGESPLIT_SERVER_PRELOAD must be true or false"):
        settings.load(ServerConfig, section="server", env={"EDGESPLIT_SERVER_PRELOAD": text})


# --- refusals -------------------------------------------------------------------------------------


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    f = _toml(tmp_path, "[server]\nmax_bach = 4\n", "pool.toml")
    with pytest.raises(ConfigError) as e:
        settings.load(ServerConfig, f, section="server", env={})
    msg = str(e.value)
    assert str(f) in msg and "server.max_bach" in msg and "did you mean max_batch" in msg
    f = _toml(tmp_path, "[server.limits]\nmax_tensor = 4\n", "nested.toml")
    with pytest.raises(ConfigError, match=r"nested\.toml: unknown key server\.limits\.max_tensor"):
        settings.load(ServerConfig, f, section="server", env={})


@pytest.mark.parametrize("text, match", [
    ("max_batch = 4\n", "top-level key 'max_batch' belongs in a table"),
    ("[sever]\nmax_batch = 4\n", r"unknown table \[sever\] \(did you mean server\?\)"),
    ("[server]\nlimits = 3\n", r"server\.limits must be a table"),
    ("[server\nmax_batch = 4\n", "not valid TOML"),
])
def test_malformed_files(tmp_path, text, match):
    f = _toml(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as e:
        settings.load(ServerConfig, f, section="server", env={})
    assert str(f) in str(e.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="cannot read config file /nonexistent/edgesplit.toml"):
        settings.load(ServerConfig, "/nonexistent/edgesplit.toml", section="server", env={})


def test_unknown_variable_with_the_prefix_is_refused_others_ignored():
    with pytest.raises(ConfigError, match="EDGESPLIT_SERVER_MAX_BACH names no ServerConfig field.*MAX_BATCH"):
        settings.load(ServerConfig, section="server", env={"EDGESPLIT_SERVER_MAX_BACH": "4"})
    # other EDGESPLIT_* variables (the agent's, the test suite's) are not server settings
    cfg = settings.load(ServerConfig, section="server",
                        env={"EDGESPLIT_AGENT_DEADLINE_MS": "x", "EDGESPLIT_VENV": "/v", "EDGESPLIT_TEST_X": "1"})
    assert cfg == ServerConfig()


@pytest.mark.parametrize("text, match", [
    ('max_batch = "8"', r"server\.max_batch must be an integer, got '8'"),
    ("max_batch = 8.5", r"server\.max_batch must be an integer"),
    ("max_batch = true", r"server\.max_batch must be an integer"),
    ("preload = 0", r"server\.preload must be true or false, got 0"),
    ('heartbeat_interval_s = "fast"', r"server\.heartbeat_interval_s must be a number"),
    ("runner = 3", r"server\.runner must be a string"),
])
def test_wrong_types_in_the_file(tmp_path, text, match):
    f = _toml(tmp_path, f"[server]\n{text}\n")
    with pytest.raises(ConfigError, match=match):
        settings.load(ServerConfig, f, section="server", env={})


@pytest.mark.parametrize("name, text", [
    ("EDGESPLIT_SERVER_MAX_BATCH", "2.5"), ("EDGESPLIT_SERVER_MAX_BATCH", "eight"),
    ("EDGESPLIT_SERVER_HEARTBEAT_INTERVAL_S", "1s"), ("EDGESPLIT_SERVER_LIMITS__MAX_TENSORS", ""),
])
def test_wrong_types_in_variables(name, text):
    with pytest.raises(ConfigError, match=name):
        settings.load(ServerConfig, section="server", env={name: text})


def test_validation_is_the_dataclass_own_and_names_the_source(tmp_path):
    f = _toml(tmp_path, "[server]\nmax_batch = 0\n")
    with pytest.raises(ConfigError, match=rf"ServerConfig\.max_batch must be > 0, got 0 \(set in {f}"):
        settings.load(ServerConfig, f, section="server", env={})
    with pytest.raises(ConfigError, match=r"reconnect_max_s must be >= reconnect_initial_s.*EDGESPLIT_SERVER"):
        settings.load(ServerConfig, section="server", env={"EDGESPLIT_SERVER_RECONNECT_MAX_S": "0.1"})
    with pytest.raises(ConfigError, match=r"Limits\.max_rank must be a positive int, got 0"):
        settings.load(ServerConfig, section="server", env={"EDGESPLIT_SERVER_LIMITS__MAX_RANK": "0"})
    with pytest.raises(ConfigError, match="Sample.count must be >= 0"):
        settings.load(Sample, section="server", env={"EDGESPLIT_SERVER_COUNT": "-1"})


# --- the agent ------------------------------------------------------------------------------------


def test_agent_config_from_file_and_env(tmp_path):
    f = _toml(tmp_path, '[agent]\ndeadline_ms = 300\nfallback = "error"\nmax_in_flight = 4\n[server]\nmax_batch = 2\n')
    cfg = AgentConfig.from_file(f, env={"EDGESPLIT_AGENT_MAX_IN_FLIGHT": "6"}, reply_codec="fp16")
    assert (cfg.deadline_ms, cfg.fallback, cfg.max_in_flight, cfg.reply_codec) == (300.0, "error", 6, "fp16")
    assert AgentConfig.from_env({}) == AgentConfig()
    with pytest.raises(ConfigError, match="AgentConfig.fallback must be one of"):
        AgentConfig.from_env({"EDGESPLIT_AGENT_FALLBACK": "pray"})
    with pytest.raises(ConfigError, match="unknown key agent.deadline"):
        AgentConfig.from_file(_toml(tmp_path, "[agent]\ndeadline = 3\n", "bad.toml"), env={})


def test_every_leaf_field_of_both_configs_can_be_set_from_a_variable():
    """Each documented variable really reaches its field (nested ones included)."""
    for cls, section in ((ServerConfig, "server"), (AgentConfig, "agent")):
        for doc in settings.describe(cls, section):
            default = cls()
            for part in doc.path.split("."):
                default = getattr(default, part)
            if default is None or isinstance(default, str):
                continue  # strings need a value the class accepts; None fields are covered above
            text = ("false" if default else "true") if isinstance(default, bool) else str(default)
            got = settings.load(cls, section=section, env={doc.env: text})
            for part in doc.path.split("."):
                got = getattr(got, part)
            assert got == (text == "true" if isinstance(default, bool) else default), doc.env


# --- the command line -----------------------------------------------------------------------------


def _parse(argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    register_serve(sub)
    register_worker(sub)
    return parser.parse_args(argv)


def test_serve_and_worker_take_config_files(tmp_path, monkeypatch):
    f = _toml(tmp_path, "[server]\nmax_batch = 2\nmax_pending = 100\nworker_capacity = 5\n[server.limits]\nmax_rank = 4\n")
    monkeypatch.setenv("EDGESPLIT_SERVER_MAX_PENDING", "200")
    monkeypatch.setenv("EDGESPLIT_SERVER_MAX_BATCH", "3")
    serve = _config(_parse(["serve", "--repository", "r", "--config", str(f), "--max-batch", "4"]))
    assert (serve.max_batch, serve.max_pending, serve.worker_capacity, serve.limits.max_rank) == (4, 200, 5, 4)
    worker = _config(_parse(["worker", "--connect", "tcp://b:5556", "--repository", "r", "--config", str(f)]))
    assert (worker.max_batch, worker.max_pending) == (3, 200)
    assert _config(_parse(["serve", "--repository", "r"])).max_batch == 3  # variables apply without a file


def test_worker_processes_keep_the_parents_settings(monkeypatch):
    """`serve` hands its resolved settings (limits included) to its worker processes as JSON; a variable in
    their inherited environment must not undo a flag the parent was given."""
    parent = ServerConfig(max_batch=4, limits=Limits(max_tensors=7))
    monkeypatch.setenv("EDGESPLIT_SERVER_MAX_BATCH", "16")
    args = _parse(["worker", "--connect", "tcp://b:1", "--repository", "r",
                   "--config-json", json.dumps(parent.to_json())])
    assert _config(args) == parent
    assert ServerConfig.from_json(json.loads(json.dumps(parent.to_json()))) == parent


def test_cli_bad_config_is_one_line_exit_1(tmp_path):
    f = _toml(tmp_path, "[server]\nmax_bach = 4\n")
    r = subprocess.run([sys.executable, "-m", "edgesplit", "serve", "--repository", str(tmp_path), "--config", str(f),
                        "--http", "off"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and "max_bach" in r.stderr and str(f) in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


# --- the documentation ----------------------------------------------------------------------------


def test_every_field_has_a_comment_for_the_docs():
    for cls, section in ((ServerConfig, "server"), (AgentConfig, "agent")):
        missing = [d.path for d in settings.describe(cls, section) if not d.comment]
        assert not missing, f"{cls.__name__} fields without a comment: {missing}"


def test_configuration_page_is_up_to_date():
    r = subprocess.run([sys.executable, "docs/gen_configuration.py", "--check"], capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    page = (REPO / "docs" / "configuration.md").read_text()
    for cls, section in ((ServerConfig, "server"), (AgentConfig, "agent")):
        for d in settings.describe(cls, section):
            assert f"| `{d.path}` | `{d.toml}` | `{d.env}` |" in page
