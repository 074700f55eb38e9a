"""The PicoSpec wire protocol: versioned messages as msgpack maps, zstd-compressed when it pays.

    frame = encode(Draft(epoch=0, pos=17, ids=[271, 3555, 11, 279]))   # ~30 bytes
    msg = decode(frame, vocab_size=151936)                               # or CodecError

decode is the security boundary of the cloud server: it bounds sizes before spending memory,
refuses zstd bombs, and checks every field's type and range. It imports neither edge_app nor
cloud: both sides share it.
"""
from codec.errors import CODES, CodecError
from codec.limits import (
    MAX_BLOCK,
    MAX_DECOMPRESSED,
    MAX_FRAME,
    MAX_PROMPT,
    MAX_STR,
    MAX_SUPPORT,
    MAX_TOP_K,
    MAX_VOCAB,
    MAX_WEIGHT,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
)
from codec.messages import (
    MESSAGE_TYPES,
    VARIANTS,
    VERDICT_KINDS,
    Close,
    Draft,
    Error,
    Generate,
    Hello,
    Message,
    Prefilled,
    Prompt,
    Tokens,
    Verdict,
    VerdictKind,
    Welcome,
    decode,
    draft_bytes,
    encode,
    error_message,
)

__all__ = [
    "CODES",
    "MAX_BLOCK",
    "MAX_DECOMPRESSED",
    "MAX_FRAME",
    "MAX_PROMPT",
    "MAX_STR",
    "MAX_SUPPORT",
    "MAX_TOP_K",
    "MAX_VOCAB",
    "MAX_WEIGHT",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "VARIANTS",
    "VERDICT_KINDS",
    "Close",
    "CodecError",
    "Draft",
    "Error",
    "Generate",
    "Hello",
    "Message",
    "Prefilled",
    "Prompt",
    "Tokens",
    "Verdict",
    "VerdictKind",
    "Welcome",
    "decode",
    "draft_bytes",
    "encode",
    "error_message",
]
