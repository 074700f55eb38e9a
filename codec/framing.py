"""Frames: one tag byte, then a msgpack body, plain or zstd-compressed.

    frame = TAG_PLAIN + msgpack(body)  |  TAG_ZSTD + zstd(msgpack(body))

A 4-token Draft is ~30 bytes, where zstd's own frame header would cost more than it saves, so
encode only tries compression from COMPRESS_MIN bytes on and keeps whichever frame is smaller.

Unframing is the security boundary, so every step is bounded before it runs:
  - the frame length against max_frame, before anything else;
  - zstd: the content size the header states against max_decompressed, and then the inflated
    bytes themselves, read through a stream reader that never produces more than the limit + 1
    (a header can lie or say nothing; ZstdDecompressor.decompress(max_output_size=...) would
    trust a stated size and allocate it);
  - msgpack: strict map keys, no ext types, small container limits, no trailing bytes.
"""
from __future__ import annotations

import threading
from typing import Any

import msgpack
import zstandard

from codec.errors import CodecError
from codec.limits import MAX_DECOMPRESSED, MAX_FRAME, MAX_STR

TAG_PLAIN = 0x00
TAG_ZSTD = 0x01
COMPRESS_MIN = 64  # plain bodies shorter than this are sent as they are
ZSTD_LEVEL = 3

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# Our bodies are flat maps of scalars, bins and two small dicts: anything bigger is not ours.
_MAX_ARRAY = 16
_MAX_MAP = 64

# zstd contexts are not thread-safe and cost ~25 us to build: one of each per thread.
_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    if not hasattr(_local, "cctx"):
        # the content size goes in the header (the decoder checks it); no checksum: the
        # transport already checks integrity, and 4 bytes are 10% of a small frame
        _local.cctx = zstandard.ZstdCompressor(
            level=ZSTD_LEVEL, write_content_size=True, write_checksum=False
        )
    return _local.cctx


def _decompressor(limit: int) -> zstandard.ZstdDecompressor:
    # A window larger than the largest allowed body is never needed; capping it stops a header
    # from asking for a huge window buffer.
    window = 1 << max(20, (limit - 1).bit_length())
    cache = _local.__dict__.setdefault("dctx", {})
    if window not in cache:
        cache[window] = zstandard.ZstdDecompressor(max_window_size=window)
    return cache[window]


def pack_frame(
    body: dict[str, Any], *, max_frame: int = MAX_FRAME, max_decompressed: int = MAX_DECOMPRESSED
) -> bytes:
    """The smaller of the plain and the zstd frame of body (a msgpack-able map)."""
    try:
        packed = msgpack.packb(body, use_bin_type=True)
    except Exception as exc:  # a value msgpack cannot carry: a bug on this side
        raise CodecError("bad_message", f"cannot pack message body: {exc}") from exc
    if len(packed) > max_decompressed:
        raise CodecError(
            "too_large", f"message body of {len(packed)} bytes, limit {max_decompressed}"
        )
    frame = bytes([TAG_PLAIN]) + packed
    if len(packed) >= COMPRESS_MIN:
        squeezed = _compressor().compress(packed)
        if 1 + len(squeezed) < len(frame):
            frame = bytes([TAG_ZSTD]) + squeezed
    if len(frame) > max_frame:
        raise CodecError("too_large", f"frame of {len(frame)} bytes, limit {max_frame}")
    return frame


def unpack_frame(
    frame: bytes, *, max_frame: int = MAX_FRAME, max_decompressed: int = MAX_DECOMPRESSED
) -> Any:
    """The msgpack object a frame carries (whatever it is: the caller checks it is a message)."""
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise CodecError("bad_frame", f"a frame is bytes, got {type(frame).__name__}")
    size = frame.nbytes if isinstance(frame, memoryview) else len(frame)
    if size > max_frame:
        raise CodecError("too_large", f"frame of {size} bytes, limit {max_frame}")
    try:
        data = bytes(frame)  # no copy for bytes; a memoryview of any format becomes plain bytes
    except Exception as exc:
        raise CodecError("bad_frame", f"unreadable frame buffer: {exc}") from exc
    if len(data) < 2:
        raise CodecError("bad_frame", f"frame of {len(data)} bytes is too short")
    tag, payload = data[0], data[1:]
    if tag == TAG_PLAIN:
        if len(payload) > max_decompressed:
            raise CodecError(
                "too_large", f"message body of {len(payload)} bytes, limit {max_decompressed}"
            )
        body = payload
    elif tag == TAG_ZSTD:
        body = inflate(payload, max_decompressed)
    else:
        raise CodecError("bad_frame", f"unknown frame tag 0x{tag:02x}")
    return unpack_body(body, max_decompressed)


def inflate(data: bytes, limit: int) -> bytes:
    """The content of exactly one zstd frame, refused past `limit` bytes without inflating more.

    Pass one reads at most limit + 1 bytes out of a stream reader whatever the header says.
    Only then, with the output known to be bounded, pass two runs a decompressobj over the same
    bytes for what the reader does not tell: did the frame end (not truncated), and did
    anything follow it. zstd inflates at GB/s, so the second pass costs little.
    """
    if data[:4] != _ZSTD_MAGIC:
        raise CodecError("bad_frame", "zstd frame tag but no zstd magic number")
    try:
        stated = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise CodecError("bad_frame", f"bad zstd frame header: {exc}") from exc
    if stated > limit:  # -1 (CONTENTSIZE_UNKNOWN) falls through to the bounded read
        raise CodecError("too_large", f"zstd frame states {stated} bytes, limit {limit}")
    dctx = _decompressor(limit)
    try:
        with dctx.stream_reader(data, read_across_frames=False) as reader:
            out = _read_at_most(reader, limit + 1)
        if len(out) > limit:
            raise CodecError("too_large", f"zstd frame inflates past {limit} bytes")
        check = dctx.decompressobj()
        check.decompress(data)
    except zstandard.ZstdError as exc:
        raise CodecError("bad_frame", f"corrupt zstd data: {exc}") from exc
    if not check.eof:
        raise CodecError("bad_frame", "zstd frame truncated")
    if check.unused_data:
        raise CodecError("bad_frame", f"{len(check.unused_data)} bytes after the zstd frame")
    if stated >= 0 and len(out) != stated:
        raise CodecError("bad_frame", f"zstd frame states {stated} bytes but holds {len(out)}")
    return out


def _read_at_most(reader: zstandard.ZstdDecompressionReader, n: int) -> bytes:
    """Up to n bytes from reader; loops because a read may return short of what is left."""
    chunks, got = [], 0
    while got < n:
        chunk = reader.read(n - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks) if len(chunks) != 1 else chunks[0]


def unpack_body(body: bytes, limit: int = MAX_DECOMPRESSED) -> Any:
    """One msgpack object and nothing after it, under strict limits; never ext types."""
    try:
        return msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=MAX_STR,
            max_bin_len=limit,
            max_array_len=_MAX_ARRAY,
            max_map_len=_MAX_MAP,
            max_ext_len=0,
        )
    except msgpack.ExtraData as exc:
        raise CodecError("bad_frame", "trailing data after the msgpack body") from exc
    except Exception as exc:  # malformed, truncated, over a limit, bad utf-8, too deep
        raise CodecError("bad_frame", f"not a msgpack body: {exc}") from exc
