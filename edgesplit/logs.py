"""Log output for every edgesplit process: readable lines for people, or one JSON object per line.

`configure(verbosity, fmt)` is called once by the CLI; `fmt` comes from `--log-format` or the
EDGESPLIT_LOG_FORMAT variable (so worker processes a server starts log the same way). JSON
lines carry the time (UTC, ISO 8601), level, logger, message, process id, and every `extra=`
field given to the logging call, so a log pipeline can index request ids and bundle ids.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from edgesplit.errors import ConfigError

__all__ = ["FORMATS", "JsonFormatter", "configure"]

FORMATS = ("text", "json")
ENV = "EDGESPLIT_LOG_FORMAT"
_TEXT = "%(asctime)s %(name)s %(levelname)s: %(message)s"
# Attributes every LogRecord has: anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record (no newlines inside), extra fields included."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def configure(verbosity: int = 0, fmt: str | None = None, stream=None) -> str:
    """Set up the root logger once: WARNING, INFO (-v) or DEBUG (-vv); returns the format used."""
    fmt = fmt or os.environ.get(ENV) or "text"
    if fmt not in FORMATS:
        raise ConfigError(f"log format {fmt!r}: choose {' or '.join(FORMATS)} (--log-format or {ENV})")
    os.environ[ENV] = fmt  # processes started from here (local workers) log alike
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.WARNING - 10 * min(verbosity, 2))
    return fmt
