"""A small GGUF metadata reader: the header and the key/value section, never the tensors.

Pure stdlib so the edge (and `picospec models`) can name a model, check its tokenizer and print its
quantisation without llama.cpp, numpy or the `gguf` package. The file is read forward in chunks, so
only the metadata (a few MiB for a 150k-token vocabulary) is ever touched, and every length field is
checked against the bytes left in the file before it is trusted: a truncated download or a random
file gives a GGUFFormatError, not a MemoryError or a hang.

Layout (v2/v3; v1 used 32-bit counts and lengths): magic "GGUF", u32 version, u64 tensor count,
u64 kv count, then kv pairs: string key, u32 value type, value. A string is a length-prefixed UTF-8
blob; an array is u32 element type, count, elements.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable

from .errors import GGUFFormatError

GGUF_MAGIC = b"GGUF"
_CHUNK = 4 << 20
_MAX_KV = 1 << 20  # far above any real file; a bigger count means the header is garbage

# GGUF value types -> (name, struct code, byte width); STRING=8 and ARRAY=9 are handled apart.
_SCALARS: dict[int, tuple[str, str, int]] = {
    0: ("uint8", "B", 1), 1: ("int8", "b", 1), 2: ("uint16", "H", 2), 3: ("int16", "h", 2),
    4: ("uint32", "I", 4), 5: ("int32", "i", 4), 6: ("float32", "f", 4), 7: ("bool", "?", 1),
    10: ("uint64", "Q", 8), 11: ("int64", "q", 8), 12: ("float64", "d", 8),
}
T_STRING, T_ARRAY = 8, 9

# llama_ftype values written to general.file_type (llama.h), for display only.
FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M",
    30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE",
}


@dataclass
class GGUFMetadata:
    """The parsed key/value section. `kv` holds Python values (ints, floats, bools, str, lists)."""

    path: Path
    version: int
    tensor_count: int
    kv: dict[str, Any] = field(default_factory=dict)
    kv_end: int = 0  # file offset where the tensor-info section starts
    skipped: tuple[str, ...] = ()  # keys whose values were walked over but not decoded

    def get(self, key: str, default: Any = None) -> Any:
        return self.kv.get(key, default)

    @property
    def architecture(self) -> str | None:
        return self.kv.get("general.architecture")

    @property
    def name(self) -> str | None:
        return self.kv.get("general.name")

    @property
    def file_type(self) -> int | None:
        return self.kv.get("general.file_type")

    @property
    def file_type_name(self) -> str | None:
        ft = self.file_type
        return None if ft is None else FILE_TYPES.get(ft, f"type {ft}")

    def arch_value(self, suffix: str) -> Any:
        """`<architecture>.<suffix>`, e.g. arch_value("context_length")."""
        arch = self.architecture
        return None if arch is None else self.kv.get(f"{arch}.{suffix}")

    @property
    def context_length(self) -> int | None:
        return self.arch_value("context_length")

    @property
    def tokens(self) -> list[str] | None:
        return self.kv.get("tokenizer.ggml.tokens")

    @property
    def bos_id(self) -> int | None:
        return self.kv.get("tokenizer.ggml.bos_token_id")

    @property
    def eos_id(self) -> int | None:
        return self.kv.get("tokenizer.ggml.eos_token_id")

    @property
    def vocab_size(self) -> int | None:
        """The logits width: `<arch>.vocab_size` if the converter wrote it, else the token count."""
        v = self.arch_value("vocab_size")
        if v is not None:
            return int(v)
        toks = self.tokens
        return None if toks is None else len(toks)


class _Reader:
    """Forward-only buffered reader that knows how many bytes the file has left."""

    def __init__(self, f: BinaryIO, size: int, path: Path):
        self.f, self.size, self.path = f, size, path
        self.buf = b""
        self.pos = 0  # position inside buf
        self.base = 0  # file offset of buf[0]
        self.endian = "<"
        self.len_code = "Q"  # u64 lengths and counts (v2+); "I" for v1
        self.len_size = 8

    @property
    def offset(self) -> int:
        return self.base + self.pos

    def remaining(self) -> int:
        return self.size - self.offset

    def fail(self, what: str) -> GGUFFormatError:
        return GGUFFormatError(
            f"{self.path}: corrupt or truncated GGUF ({what} at byte {self.offset} of "
            f"{self.size}); delete the file and fetch it again"
        )

    def need(self, n: int) -> None:
        if len(self.buf) - self.pos >= n:
            return
        if n > self.remaining():
            raise self.fail(f"needs {n} more bytes, file ends")
        # Drop consumed bytes, then read enough for this request (at least a chunk).
        self.buf = self.buf[self.pos:]
        self.base += self.pos
        self.pos = 0
        want = max(n - len(self.buf), _CHUNK)
        more = self.f.read(want)
        self.buf += more
        if len(self.buf) < n:
            raise self.fail("file shorter than its size")

    def unpack(self, code: str, width: int) -> Any:
        self.need(width)
        (v,) = struct.unpack_from(self.endian + code, self.buf, self.pos)
        self.pos += width
        return v

    def length(self, what: str, min_item: int = 1) -> int:
        """A length/count field, refused if it promises more items than the file could hold."""
        n = self.unpack(self.len_code, self.len_size)
        if n * min_item > self.remaining():
            raise self.fail(f"{what} of {n} exceeds the file")
        return n

    def raw_string(self) -> bytes:
        n = self.length("string length")
        self.need(n)
        s = self.buf[self.pos:self.pos + n]
        self.pos += n
        return s

    def string(self) -> str:
        # surrogateescape keeps non-UTF-8 token bytes round-trippable for hashing.
        return self.raw_string().decode("utf-8", "surrogateescape")

    def skip(self, n: int) -> None:
        if n > self.remaining():
            raise self.fail(f"skip of {n} bytes exceeds the file")
        have = len(self.buf) - self.pos
        if n <= have:
            self.pos += n
            return
        # Jump over the rest without reading it.
        self.f.seek(self.offset + n)
        self.base, self.buf, self.pos = self.offset + n, b"", 0

    def string_list(self, count: int, decode: bool = True) -> list[str]:
        """`count` length-prefixed strings. The hot loop of a 150k-token vocabulary: it works on
        local copies of the buffer state and only calls need() when a refill is due."""
        out: list[str] = []
        append = out.append
        unpack = struct.Struct(self.endian + self.len_code).unpack_from
        lw = self.len_size
        buf, pos, end = self.buf, self.pos, len(self.buf)
        for _ in range(count):
            if end - pos < lw:
                self.pos = pos
                self.need(lw)
                buf, pos, end = self.buf, self.pos, len(self.buf)
            n = unpack(buf, pos)[0]
            pos += lw
            if end - pos < n:
                self.pos = pos
                if n > self.remaining():
                    raise self.fail(f"string length {n} exceeds the file")
                self.need(n)
                buf, pos, end = self.buf, self.pos, len(self.buf)
            if decode:
                append(buf[pos:pos + n].decode("utf-8", "surrogateescape"))
            pos += n
        self.pos = pos
        return out

    def value(self, vtype: int, decode: bool = True) -> Any:
        if vtype in _SCALARS:
            _, code, width = _SCALARS[vtype]
            if not decode:
                self.skip(width)
                return None
            return self.unpack(code, width)
        if vtype == T_STRING:
            if not decode:
                self.skip(self.length("string length"))
                return None
            return self.string()
        if vtype == T_ARRAY:
            return self.array(decode)
        raise self.fail(f"unknown value type {vtype}")

    def array(self, decode: bool) -> Any:
        etype = self.unpack("I", 4)
        if etype in _SCALARS:
            _, code, width = _SCALARS[etype]
            count = self.length("array count", width)
            if not decode:
                self.skip(count * width)
                return None
            self.need(count * width)
            vals = struct.unpack_from(f"{self.endian}{count}{code}", self.buf, self.pos)
            self.pos += count * width
            return list(vals)
        if etype == T_STRING:
            count = self.length("string array count", self.len_size)
            vals = self.string_list(count, decode)
            return vals if decode else None
        if etype == T_ARRAY:
            count = self.length("nested array count", 4 + self.len_size)
            vals = [self.array(decode) for _ in range(count)]
            return vals if decode else None
        raise self.fail(f"unknown array element type {etype}")


def _read_header(r: _Reader) -> tuple[int, int, int]:
    r.need(4)
    if r.buf[:4] != GGUF_MAGIC:
        raise GGUFFormatError(f"{r.path}: not a GGUF file (starts with {r.buf[:4]!r}, "
                              f"expected b'GGUF')")
    r.pos = 4
    version = r.unpack("I", 4)
    if version & 0xFFFF == 0 and 0 < (version >> 24) <= 3:
        # A big-endian file (s390x conversions): every field is byte-swapped.
        r.endian = ">"
        version >>= 24
    if version not in (1, 2, 3):
        raise GGUFFormatError(f"{r.path}: unsupported GGUF version {version} "
                              f"(this reader knows 1-3)")
    if version == 1:
        r.len_code, r.len_size = "I", 4
    tensor_count = r.unpack(r.len_code, r.len_size)
    kv_count = r.unpack(r.len_code, r.len_size)
    if kv_count > _MAX_KV:
        raise r.fail(f"implausible key/value count {kv_count}")
    return version, tensor_count, kv_count


def read_metadata(path: str | os.PathLike[str], *, skip: Iterable[str] = ()) -> GGUFMetadata:
    """Parse a GGUF file's header and key/value section.

    `skip` names keys whose values are walked over without being decoded (for instance
    "tokenizer.ggml.merges" when only the token list is needed): this saves most of the time on a
    large vocabulary. Raises GGUFFormatError on anything malformed, ModelError subclasses only.
    """
    p = Path(path)
    skip_set = frozenset(skip)
    try:
        f = open(p, "rb")
    except FileNotFoundError:
        raise GGUFFormatError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise GGUFFormatError(f"{p}: is a directory, not a GGUF file") from None
    with f:
        r = _Reader(f, os.fstat(f.fileno()).st_size, p)
        version, tensor_count, kv_count = _read_header(r)
        kv: dict[str, Any] = {}
        skipped: list[str] = []
        for _ in range(kv_count):
            key = r.string()
            vtype = r.unpack("I", 4)
            if key in skip_set:
                r.value(vtype, decode=False)
                skipped.append(key)
            else:
                kv[key] = r.value(vtype)
        return GGUFMetadata(p, version, tensor_count, kv, r.offset, tuple(skipped))


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """True when the file starts with the GGUF magic (cheap: reads 4 bytes)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False
