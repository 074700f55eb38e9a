"""The verifier's logs: plain text for a terminal, or one JSON object per line for a collector.

Server code logs with `extra={"session": ..., "event": ...}` so that every line about a session
carries its id in a field of its own, not only inside the message.
"""
from __future__ import annotations

import json
import logging
import sys

# record attributes that become JSON fields when a log call sets them (extra=...)
FIELDS = ("session", "event", "code", "peer", "passes", "drafted", "accepted", "seconds")


class JsonFormatter(logging.Formatter):
    """{"time", "level", "logger", "msg", and any of FIELDS the record carries}."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": round(record.created, 6), "level": record.levelname, "logger": record.name,
               "msg": record.getMessage()}
        for key in FIELDS:
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "INFO", json_lines: bool = False, stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
