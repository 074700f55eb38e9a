"""The one error the verifier's session code raises: a protocol violation by one edge."""
from __future__ import annotations


class SessionError(Exception):
    """Bad input from one edge: the server sends Error(code, message) and closes that session only.

    code: a codec error code ("bad_message", "too_large", ...) or the server's own
    ("unauthorized", "overloaded", "rate_limited", "timeout", "idle_timeout", ...).
    """

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message
