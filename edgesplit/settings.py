"""Settings from a TOML file and ``EDGESPLIT_*`` environment variables, onto a frozen config dataclass.

One source of truth: the dataclass (``ServerConfig``, ``AgentConfig``) names the fields, their
types, defaults and comments; this module only maps text onto them. Precedence, lowest first:

    dataclass defaults  <  TOML file, table [SECTION]  <  EDGESPLIT_SECTION_FIELD  <  explicit overrides

    [server]                      # EDGESPLIT_SERVER_MAX_BATCH=16
    max_batch = 16
    intra_op_threads = "none"     # TOML has no null: "none" means None for an optional field
    [server.limits]               # EDGESPLIT_SERVER_LIMITS__MAX_TENSORS=32 (nested: "__")
    max_tensors = 32

Values are converted from the field's type (int, float, bool, str, tuples, ``X | None``, nested
dataclasses); an unknown key, a value of the wrong type or an unknown ``EDGESPLIT_SECTION_*``
variable is a ConfigError that names the key and where it came from. The dataclass's own
``__post_init__`` then validates the whole. Stdlib only (tomllib).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import re
import sys
import types
import typing
from typing import Any, Mapping, TypeVar

from edgesplit.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 has no tomllib
    tomllib = None

__all__ = ["SECTIONS", "ENV_PREFIX", "FieldDoc", "load", "read_toml", "env_name", "parse_bool", "parse_size", "describe",
           "markdown_table"]

T = TypeVar("T")

# The tables an edgesplit config file may hold: one file can configure a server and an agent.
SECTIONS = ("server", "agent")
ENV_PREFIX = "EDGESPLIT_"
# Nested dataclass fields in variable names: EDGESPLIT_SERVER_LIMITS__MAX_TENSORS.
_NEST = "__"
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
_NONE = "none"


def env_name(section: str, path: str) -> str:
    """The variable for a field: ``env_name("server", "limits.max_tensors")`` -> EDGESPLIT_SERVER_LIMITS__MAX_TENSORS."""
    return f"{ENV_PREFIX}{section.upper()}_" + _NEST.join(p.upper() for p in path.split("."))


def parse_bool(text: str, where: str) -> bool:
    """"true"/"1"/"yes"/"on" or "false"/"0"/"no"/"off" (any case); anything else is an error, never True."""
    t = text.strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise ConfigError(f"{where} must be true or false (or 1/0, yes/no, on/off), got {text!r}")


_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(i?)b?\s*\Z", re.IGNORECASE)


def parse_size(text: str | int, where: str) -> int:
    """Bytes from "40MB", "1.5GiB", "512k" or a plain number (k/M/G/T: powers of 1000, with i: of 1024)."""
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    m = _SIZE.match(str(text))
    if m is None:
        raise ConfigError(f"{where} must be a size such as 40MB, 1.5GiB or 1048576, got {text!r}")
    power = "kmgt".find(m.group(2).lower()) + 1 if m.group(2) else 0
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


def read_toml(path: str | os.PathLike) -> dict:
    """The parsed file; a missing or malformed file is a ConfigError that names it."""
    if tomllib is None:  # pragma: no cover
        raise ConfigError("TOML config files need Python 3.11 or later (tomllib)")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {os.fspath(path)}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{os.fspath(path)}: not valid TOML: {exc}") from None
    for key, value in data.items():
        if not isinstance(value, dict):
            raise ConfigError(f"{os.fspath(path)}: top-level key {key!r} belongs in a table: "
                              f"{', '.join(f'[{s}]' for s in SECTIONS)}")
        if key not in SECTIONS:
            raise ConfigError(f"{os.fspath(path)}: unknown table [{key}]{_suggest(key, SECTIONS)}; "
                              f"known: {', '.join(SECTIONS)}")
    return data


def load(cls: type[T], path: str | os.PathLike | None = None, *, section: str,
         env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None,
         base: T | None = None) -> T:
    """An instance of the frozen dataclass `cls` from its defaults, a file, the environment and overrides.

    Args:
        cls: the config dataclass (``ServerConfig``, ``AgentConfig``).
        path: a TOML file; its table ``[section]`` is read (other known tables are left alone).
        section: the table name and the variable prefix (``EDGESPLIT_<SECTION>_``).
        env: variables to read (default ``os.environ``; ``{}`` reads none).
        overrides: field values already typed (explicit command-line flags), applied last.
        base: start from this instance instead of the defaults.

    Raises:
        ConfigError: unknown key or variable, unconvertible value, or what ``__post_init__`` refuses.
    """
    values: dict[str, Any] = {}  # field path "a.b" -> value
    origin: dict[str, str] = {}
    if path is not None:
        where = os.fspath(path)
        table = read_toml(path).get(section, {})
        for p, v in _flatten(cls, table, where, f"{section}."):
            values[p], origin[p] = v, f"{where} [{section}]"
    prefix = f"{ENV_PREFIX}{section.upper()}_"
    env = os.environ if env is None else env
    by_name = {env_name(section, p): (p, t) for p, t in _leaves(cls)}
    for name in sorted(env):
        if not name.startswith(prefix):
            continue
        if name not in by_name:
            raise ConfigError(f"environment variable {name} names no {cls.__name__} field"
                              f"{_suggest(name, by_name)}")
        p, t = by_name[name]
        values[p], origin[p] = _from_text(t, env[name], name), f"environment {name}"
    if overrides:
        for key, v in overrides.items():
            values[key], origin[key] = v, "command line"
    try:
        return _build(cls, values, base)
    except ConfigError as exc:
        msg = str(exc)
        for p, o in origin.items():
            if re.search(rf"\b{re.escape(p.split('.')[-1])}\b", msg):
                raise ConfigError(f"{msg} (set in {o})") from None
        raise


@dataclasses.dataclass(frozen=True)
class FieldDoc:
    """One documented setting (a leaf field; nested dataclass fields are flattened with dots)."""

    path: str  # "limits.max_tensors"
    toml: str  # "[server.limits] max_tensors"
    env: str  # "EDGESPLIT_SERVER_LIMITS__MAX_TENSORS"
    type: str  # "int", "float | None", ...
    default: str  # as it would be written in TOML
    comment: str


def describe(cls: type, section: str) -> list[FieldDoc]:
    """Every leaf field of `cls` with its TOML key, variable, type, default and source comment."""
    out = []
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        default = _default(f)
        if dataclasses.is_dataclass(t):
            for sub in describe(t, f"{section}.{f.name}"):
                out.append(dataclasses.replace(sub, path=f"{f.name}.{sub.path}",
                                               env=env_name(section, f"{f.name}.{sub.path}")))
            continue
        out.append(FieldDoc(path=f.name, toml=f"[{section}] {f.name}", env=env_name(section, f.name),
                            type=_type_text(t), default=_toml_text(default), comment=comments.get(f.name, "")))
    return out


def markdown_table(cls: type, section: str) -> str:
    """The settings table of docs/configuration.md for one config class."""
    rows = ["| field | TOML key | environment variable | type | default | meaning |",
            "|---|---|---|---|---|---|"]
    for d in describe(cls, section):
        cells = (f"`{d.path}`", f"`{d.toml}`", f"`{d.env}`", d.type, f"`{d.default}`", d.comment)
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"


# --- conversion ---------------------------------------------------------------------------------


def _leaves(cls: type, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            yield from _leaves(t, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", t


def _flatten(cls: type, table: Mapping[str, Any], where: str, shown: str):
    """(field path, typed value) for every key of a TOML table; unknown keys refused."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in table.items():
        if key not in hints or key not in names:
            raise ConfigError(f"{where}: unknown key {shown}{key}{_suggest(key, names)} "
                              f"({cls.__name__} has no such field)")
        t = hints[key]
        if dataclasses.is_dataclass(t):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {shown}{key} must be a table ([{shown}{key}]), got {value!r}")
            for p, v in _flatten(t, value, where, f"{shown}{key}."):
                yield f"{key}.{p}", v
        else:
            yield key, _from_toml(t, value, f"{where}: {shown}{key}")


def _optional(t) -> tuple[Any, bool]:
    """(the type inside ``X | None``, True) or (t, False)."""
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(t)) == 2:
            return args[0], True
        raise ConfigError(f"unsupported settings type {t!r}")
    return t, False


def _from_toml(t, value, where: str):
    t, optional = _optional(t)
    if optional and isinstance(value, str) and value.strip().lower() == _NONE:
        return None
    origin = typing.get_origin(t)
    if origin in (tuple, list):
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be an array, got {value!r}")
        item = _item_type(t)
        seq = [_from_toml(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(seq) if origin is tuple else seq
    if t is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if t is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported settings type {t!r}")


def _from_text(t, text: str, where: str):
    t, optional = _optional(t)
    if optional and text.strip().lower() in (_NONE, ""):
        return None
    origin = typing.get_origin(t)
    if origin in (tuple, list):
        item = _item_type(t)
        parts = [p.strip() for p in text.split(",")] if text.strip() else []
        seq = [_from_text(item, p, f"{where}[{i}]") for i, p in enumerate(parts)]
        return tuple(seq) if origin is tuple else seq
    if t is bool:
        return parse_bool(text, where)
    if t is int:
        try:
            return int(text.strip())
        except ValueError:
            raise ConfigError(f"{where} must be an integer, got {text!r}") from None
    if t is float:
        try:
            return float(text.strip())
        except ValueError:
            raise ConfigError(f"{where} must be a number, got {text!r}") from None
    if t is str:
        return text
    raise ConfigError(f"{where}: unsupported settings type {t!r}")


def _item_type(t):
    args = typing.get_args(t)
    if typing.get_origin(t) is tuple and not (len(args) == 2 and args[1] is Ellipsis) and len(args) != 1:
        raise ConfigError(f"unsupported settings type {t!r} (tuple[X, ...] only)")
    return args[0] if args else str


def _build(cls: type[T], values: Mapping[str, Any], base: T | None) -> T:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        current = getattr(base, f.name) if base is not None else _default(f)
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            sub = {k[len(f.name) + 1:]: v for k, v in values.items() if k.startswith(f"{f.name}.")}
            if f.name in values:  # an explicit whole object (an override)
                kwargs[f.name] = values[f.name]
            elif sub:
                kwargs[f.name] = _build(t, sub, current)
            else:
                kwargs[f.name] = current
        else:
            kwargs[f.name] = values.get(f.name, current)
    unknown = {k.split(".")[0] for k in values} - set(kwargs)
    if unknown:
        raise ConfigError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    return cls(**kwargs)


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise ConfigError(f"field {f.name} has no default; settings need defaults for every field")


def _suggest(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


# --- documentation ------------------------------------------------------------------------------


def _type_text(t) -> str:
    if isinstance(t, type) and not typing.get_args(t):
        return t.__name__
    return re.sub(r"\b(typing|builtins)\.", "", str(t)).replace("NoneType", "None")


def _toml_text(v) -> str:
    if v is None:
        return '"none"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_toml_text(x) for x in v) + "]"
    return repr(v)


_FIELD_LINE = re.compile(r"^(\s+)(\w+)\s*:\s*[^=#]+?(?:=\s*(.*?))?\s*(?:#\s*(.*))?$")


def _field_comments(cls: type) -> dict[str, str]:
    """The comment above each field (or at its line's end); a field right below another one that
    has no comment of its own shares that field's comment (a group such as initial/max)."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    pending: list[str] = []
    last = ""
    for line in lines[1:]:
        s = line.strip()
        if s.startswith(("def ", "@")):
            break
        if not s:
            pending, last = [], ""
            continue
        if s.startswith("#"):
            text = s.lstrip("#").strip()
            if text.startswith("---"):
                pending, last = [], ""
            else:
                pending.append(text)
            continue
        m = _FIELD_LINE.match(line)
        if m and m.group(2) in names:
            comment = " ".join(pending) or (m.group(4) or "").strip() or last
            out[m.group(2)] = comment
            last, pending = comment, []
        else:
            pending = []
    return out
