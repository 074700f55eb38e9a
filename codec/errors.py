"""The one exception the codec raises, for frames it will not send or accept."""
from __future__ import annotations

# What went wrong, coarse enough for the other side to act on (and to echo in an Error message):
#   too_large   - the frame, or what it inflates to, is over a size limit
#   bad_frame   - not our framing, not zstd / msgpack, truncated, or trailing bytes
#   bad_version - a protocol version this side does not speak
#   bad_message - well-formed msgpack but not a valid message (type, field, range, length)
CODES = ("too_large", "bad_frame", "bad_version", "bad_message")


class CodecError(Exception):
    """A frame or message refused by encode or decode. `code` is one of CODES."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def bad_message(where: str, why: str) -> CodecError:
    """The error for a field or message that breaks the schema; `where` names it (Draft.ids)."""
    return CodecError("bad_message", f"{where}: {why}")
