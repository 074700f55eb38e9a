"""Compact binary packing of id lists, float lists and sparse distributions.

msgpack spends 3 bytes on an int in [256, 65536) and 5 above; token ids of a 150k vocabulary
and weights out of 4096 sit right there. LEB128 varints spend 2 bytes below 16384 and 3 below 2M,
and a run of them travels as one msgpack bin. Long runs go through vectorised numpy, so a 32k-id
prompt or a 64 x 8k-entry draft packs and unpacks without a Python loop per value; short runs
(a greedy Draft's 4 ids) through a plain loop, which beats numpy's per-call overhead there.

Unpacking is defensive: it gets bytes from a stranger and raises CodecError("bad_message").
"""
from __future__ import annotations

import numpy as np

from codec.errors import CodecError, bad_message
from codec.limits import MAX_BLOCK, MAX_SUPPORT, MAX_VOCAB, MAX_WEIGHT
from sampling import SparseDist

# 5 varint bytes carry 35 bits: every id, weight and delta fits, and int64 sums cannot overflow.
VARINT_MAX_BYTES = 5
VARINT_LIMIT = 1 << (7 * VARINT_MAX_BYTES)
_SHIFTS = 7 * np.arange(VARINT_MAX_BYTES, dtype=np.int64)
# Up to this many values (packing) or bytes (unpacking) the plain loop wins: numpy's fixed cost
# per call would exceed it, and a Draft's ids or dists are mostly this small.
_SMALL_PACK = 256
_SMALL_UNPACK = 256


def _pack_varints_small(values: list[int]) -> bytes:
    out = bytearray()
    for v in values:
        if not 0 <= v < VARINT_LIMIT:
            raise CodecError("bad_message", "varint value out of range")  # callers check first
        while v >= 0x80:
            out.append((v & 0x7F) | 0x80)
            v >>= 7
        out.append(v)
    return bytes(out)


def _unpack_varints_small(data: bytes, where: str) -> list[int]:
    values: list[int] = []
    value = shift = 0
    for byte in data:
        if shift == 7 * VARINT_MAX_BYTES:
            raise bad_message(where, f"varint longer than {VARINT_MAX_BYTES} bytes")
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            if byte == 0 and shift > 7:
                raise bad_message(where, "non-minimal varint")
            values.append(value)
            value = shift = 0
    if shift:
        raise bad_message(where, "truncated varint")
    return values


def pack_varints(values: np.ndarray) -> bytes:
    """LEB128 bytes of values: int64[n], each in [0, VARINT_LIMIT). Low 7 bits first."""
    v = np.asarray(values, dtype=np.int64)
    if v.size <= _SMALL_PACK:
        return _pack_varints_small(v.tolist())
    if int(v.min()) < 0 or int(v.max()) >= VARINT_LIMIT:
        raise CodecError("bad_message", "varint value out of range")  # callers check first
    groups = (v[:, None] >> _SHIFTS) & 0x7F  # [n, 5], low group first
    nbytes = 1 + (v[:, None] >= (1 << _SHIFTS[1:])).sum(axis=1)  # [n]
    slot = np.arange(VARINT_MAX_BYTES)
    more = slot < (nbytes - 1)[:, None]  # continuation bit on all but a value's last byte
    used = slot < nbytes[:, None]
    # boolean indexing walks the [n, 5] grid row by row: values stay in order
    return (groups | (more.astype(np.int64) << 7))[used].astype(np.uint8).tobytes()


def unpack_varints(data: bytes, where: str) -> np.ndarray:
    """The int64[n] values of LEB128 bytes; refuses truncated, over-long or non-minimal ones.

    Non-minimal encodings (a trailing 0x00 group) are refused so each value has one spelling.
    """
    if len(data) <= _SMALL_UNPACK:
        return np.array(_unpack_varints_small(data, where), dtype=np.int64)
    b = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(b < 0x80)
    if ends.size == 0 or int(ends[-1]) != b.size - 1:
        raise bad_message(where, "truncated varint")
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    if int(lengths.max()) > VARINT_MAX_BYTES:
        raise bad_message(where, f"varint longer than {VARINT_MAX_BYTES} bytes")
    if bool(np.any((lengths > 1) & (b[ends] == 0))):
        raise bad_message(where, "non-minimal varint")
    shift = 7 * (np.arange(b.size, dtype=np.int64) - np.repeat(starts, lengths))
    parts = (b & 0x7F).astype(np.int64) << shift
    return np.add.reduceat(parts, starts)


def pack_floats(values: np.ndarray) -> bytes:
    """Little-endian float64 bytes of values: float64[n]. Exact: what was computed is what lands."""
    return np.asarray(values, dtype="<f8").tobytes()


def unpack_floats(data: bytes, where: str) -> np.ndarray:
    """float64[n] from little-endian float64 bytes; finiteness and range are the caller's."""
    if len(data) % 8:
        raise bad_message(where, f"{len(data)} bytes is not a whole number of float64s")
    return np.frombuffer(data, dtype="<f8").astype(np.float64)


def check_dist(ids: np.ndarray, weights: np.ndarray, where: str, vocab_size: int | None) -> None:
    """Refuse a distribution that cannot be what a drafter sampled from.

    ids: int[n] ascending unique in [0, vocab); weights: int[n] in [1, MAX_WEIGHT];
    1 <= n <= MAX_SUPPORT. Integer dtypes only, so bools and floats never pass as weights.
    """
    for name, arr in (("ids", ids), ("weights", weights)):
        if not isinstance(arr, np.ndarray) or arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise bad_message(where, f"{name} must be a 1-d integer array")
    n = len(ids)
    if len(weights) != n:
        raise bad_message(where, f"{n} ids but {len(weights)} weights")
    if not 1 <= n <= MAX_SUPPORT:
        raise bad_message(where, f"support of {n} entries, allowed 1..{MAX_SUPPORT}")
    # ascending first: then the range check is two lookups, not two passes (this runs per
    # drafted token, on the Pi too)
    if n > 1 and int(np.diff(ids).min()) < 1:
        raise bad_message(where, "ids must be strictly ascending")
    top = MAX_VOCAB if vocab_size is None else vocab_size
    if int(ids[0]) < 0 or int(ids[-1]) >= top:
        raise bad_message(where, f"id outside [0, {top})")
    if int(weights.min()) < 1 or int(weights.max()) > MAX_WEIGHT:
        raise bad_message(where, f"weight outside [1, {MAX_WEIGHT}]")


def pack_dists(dists: list[SparseDist]) -> bytes:
    """One varint run for a block of checked distributions.

    Per distribution: n, ids[0], the n-1 gaps between ascending ids (each > 0), the n weights.
    Gaps keep ids of a top-p support, which cluster, at 1-2 bytes instead of 3.
    """
    parts: list[np.ndarray] = []
    for d in dists:
        ids = np.asarray(d.ids, dtype=np.int64)
        parts += [np.array([len(ids), ids[0]]), np.diff(ids), np.asarray(d.weights, np.int64)]
    return pack_varints(np.concatenate(parts)) if parts else b""


def unpack_dists(data: bytes, where: str, vocab_size: int | None) -> list[SparseDist]:
    """The distributions of a pack_dists run, each checked by check_dist."""
    values = unpack_varints(data, where)
    dists: list[SparseDist] = []
    p = 0
    while p < len(values):
        if len(dists) == MAX_BLOCK:
            raise bad_message(where, f"more than {MAX_BLOCK} distributions")
        n = int(values[p])
        if not 1 <= n <= MAX_SUPPORT:
            raise bad_message(where, f"support of {n} entries, allowed 1..{MAX_SUPPORT}")
        end = p + 1 + 2 * n
        if end > len(values):
            raise bad_message(where, "distribution runs past the end of its bytes")
        # gaps < VARINT_LIMIT and n <= MAX_SUPPORT: the running sum stays far inside int64;
        # a zero gap (ids not ascending) is caught by check_dist
        ids = np.cumsum(values[p + 1 : p + 1 + n])
        weights = values[p + 1 + n : end].copy()
        check_dist(ids, weights, f"{where}[{len(dists)}]", vocab_size)
        dists.append(SparseDist(ids, weights))
        p = end
    return dists
