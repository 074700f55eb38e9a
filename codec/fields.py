"""Field codecs: how each kind of message field is checked and put on / taken off the wire.

A FieldCodec is a pair of functions, both of which check everything they see:
    enc(value, where) -> wire value       (this side's own message: catches bugs before sending)
    dec(wire, where, vocab_size) -> value (a stranger's bytes: the security boundary)
`where` names the field in errors ("Draft.ids"); vocab_size, when known, bounds token ids.
Ints must be real ints (never bools, never floats); floats finite; strings and lists bounded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NoReturn, Sequence

import numpy as np

from codec.errors import bad_message
from codec.limits import (
    MAX_EXTRA_KEYS,
    MAX_NAME,
    MAX_SEED,
    MAX_UINT,
    MAX_VOCAB,
)
from codec.packing import (
    check_dist,
    pack_dists,
    pack_floats,
    pack_varints,
    unpack_dists,
    unpack_floats,
    unpack_varints,
)
from sampling import SparseDist


@dataclass(frozen=True)
class FieldCodec:
    enc: Callable[[Any, str], Any]
    dec: Callable[[Any, str, int | None], Any]


def fail(where: str, why: str) -> NoReturn:
    raise bad_message(where, why)


def id_bound(vocab_size: int | None) -> int:
    """Largest token id allowed: vocab_size - 1, or the protocol's ceiling when unknown."""
    return (MAX_VOCAB if vocab_size is None else vocab_size) - 1


# ---- scalars ------------------------------------------------------------------------------


def as_int(v: Any, where: str, lo: int = 0, hi: int = MAX_UINT) -> int:
    """v as an int in [lo, hi]; numpy ints pass, bools and floats do not."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        fail(where, f"expected an integer, got {type(v).__name__}")
    v = int(v)
    if not lo <= v <= hi:
        fail(where, f"{v} outside [{lo}, {hi}]")
    return v


def as_float(v: Any, where: str, lo: float, hi: float, lo_open: bool = False) -> float:
    """v as a finite float in [lo, hi] (or (lo, hi]); ints pass, bools do not."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        fail(where, f"expected a number, got {type(v).__name__}")
    f = float(v)
    if not math.isfinite(f) or f > hi or f < lo or (lo_open and f == lo):
        fail(where, f"{v} outside {'(' if lo_open else '['}{lo}, {hi}]")
    return f


def as_bool(v: Any, where: str) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        fail(where, f"expected a bool, got {type(v).__name__}")
    return bool(v)


def as_str(v: Any, where: str, max_len: int) -> str:
    if not isinstance(v, str):
        fail(where, f"expected a string, got {type(v).__name__}")
    if len(v) > max_len:
        fail(where, f"string of {len(v)} characters, limit {max_len}")
    return v


def optional(check: Callable[..., Any]) -> Callable[..., Any]:
    """check, letting None through."""
    return lambda v, *args, **kw: None if v is None else check(v, *args, **kw)


# ---- arrays -------------------------------------------------------------------------------


def as_int_array(values: Any, where: str, hi: int, max_len: int) -> np.ndarray:
    """values (list / tuple / 1-d int ndarray) as int64[n], each in [0, hi], n <= max_len."""
    if isinstance(values, np.ndarray):
        if values.ndim != 1 or values.dtype.kind not in "iu":
            fail(where, f"expected a 1-d integer array, got {values.dtype} x {values.ndim}d")
        arr = values
    elif isinstance(values, (list, tuple)):
        if len(values) > max_len:
            fail(where, f"{len(values)} entries, limit {max_len}")
        # fast path for the usual list of plain ints; anything else is checked one by one
        if not all(type(x) is int for x in values):
            values = [as_int(x, where, 0, hi) for x in values]
        try:
            arr = np.array(values, dtype=np.int64)
        except OverflowError:
            fail(where, f"value outside [0, {hi}]")
    else:
        fail(where, f"expected a list of integers, got {type(values).__name__}")
    if len(arr) > max_len:
        fail(where, f"{len(arr)} entries, limit {max_len}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > hi):
        fail(where, f"value outside [0, {hi}]")
    return arr.astype(np.int64, copy=False)


def as_float_array(values: Any, where: str, lo: float, lo_open: bool, max_len: int) -> np.ndarray:
    """values as float64[n], each finite in [lo, 1] (or (lo, 1]), n <= max_len."""
    if isinstance(values, np.ndarray):
        if values.ndim != 1 or values.dtype.kind not in "iuf":
            fail(where, f"expected a 1-d float array, got {values.dtype} x {values.ndim}d")
        arr = values.astype(np.float64)
    elif isinstance(values, (list, tuple)):
        if len(values) > max_len:
            fail(where, f"{len(values)} entries, limit {max_len}")
        arr = np.array([as_float(x, where, -math.inf, math.inf) for x in values], dtype=np.float64)
    else:
        fail(where, f"expected a list of numbers, got {type(values).__name__}")
    if len(arr) > max_len:
        fail(where, f"{len(arr)} entries, limit {max_len}")
    bad = ~np.isfinite(arr) | (arr > 1.0) | ((arr <= lo) if lo_open else (arr < lo))
    if bool(bad.any()):
        fail(where, f"value {arr[bad][0]} outside {'(' if lo_open else '['}{lo}, 1]")
    return arr


def expect_bytes(wire: Any, where: str) -> bytes:
    if not isinstance(wire, bytes):
        fail(where, f"expected packed bytes, got {type(wire).__name__}")
    return wire


# ---- field codecs -------------------------------------------------------------------------


def same_both_ways(check: Callable[[Any, str], Any]) -> FieldCodec:
    """A field whose wire form is its value: both directions are the one check."""
    return FieldCodec(enc=check, dec=lambda v, where, _vocab: check(v, where))


def uint(hi: int = MAX_UINT, lo: int = 0) -> FieldCodec:
    return same_both_ways(lambda v, where: as_int(v, where, lo, hi))


def seconds() -> FieldCodec:
    """A duration: finite, >= 0; the wire carries the float64 as it is."""
    return same_both_ways(lambda v, where: as_float(v, where, 0.0, math.inf))


def flag() -> FieldCodec:
    return same_both_ways(as_bool)


def text(max_len: int = MAX_NAME, nullable: bool = False) -> FieldCodec:
    check = optional(as_str) if nullable else as_str
    return same_both_ways(lambda v, where: check(v, where, max_len))


def choice(options: Sequence[str]) -> FieldCodec:
    """One of a few strings, sent as its index (1 byte instead of the word)."""

    def enc(v: Any, where: str) -> int:
        if not isinstance(v, str) or v not in options:
            fail(where, f"{v!r} is not one of {list(options)}")
        return options.index(v)

    def dec(v: Any, where: str, _: int | None) -> str:
        return options[as_int(v, where, 0, len(options) - 1)]

    return FieldCodec(enc=enc, dec=dec)


def token_id(nullable: bool = False) -> FieldCodec:
    check = optional(as_int) if nullable else as_int
    return FieldCodec(
        enc=lambda v, w: check(v, w, 0, id_bound(None)),
        dec=lambda v, w, vocab: check(v, w, 0, id_bound(vocab)),
    )


def id_list(max_len: int, nullable: bool = False) -> FieldCodec:
    """Token ids as one varint bin; decoded to list[int]."""

    def enc(v: Any, where: str) -> bytes | None:
        if v is None and nullable:
            return None
        return pack_varints(as_int_array(v, where, id_bound(None), max_len))

    def dec(v: Any, where: str, vocab: int | None) -> list[int] | None:
        if v is None and nullable:
            return None
        ids = unpack_varints(expect_bytes(v, where), where)
        return as_int_array(ids, where, id_bound(vocab), max_len).tolist()

    return FieldCodec(enc=enc, dec=dec)


def prob_list(max_len: int, lo_open: bool) -> FieldCodec:
    """Optional probabilities in (0, 1] (lo_open) or [0, 1], as one float64 bin."""

    def enc(v: Any, where: str) -> bytes | None:
        return None if v is None else pack_floats(as_float_array(v, where, 0.0, lo_open, max_len))

    def dec(v: Any, where: str, _: int | None) -> list[float] | None:
        if v is None:
            return None
        arr = unpack_floats(expect_bytes(v, where), where)
        return as_float_array(arr, where, 0.0, lo_open, max_len).tolist()

    return FieldCodec(enc=enc, dec=dec)


def dist_list(max_len: int) -> FieldCodec:
    """Optional list[SparseDist], all in one varint bin (see packing.pack_dists)."""

    def enc(v: Any, where: str) -> bytes | None:
        if v is None:
            return None
        if not isinstance(v, (list, tuple)) or len(v) > max_len:
            fail(where, f"expected a list of at most {max_len} SparseDist")
        for i, d in enumerate(v):
            if not isinstance(d, SparseDist):
                fail(f"{where}[{i}]", f"expected a SparseDist, got {type(d).__name__}")
            check_dist(d.ids, d.weights, f"{where}[{i}]", None)
        return pack_dists(list(v))

    def dec(v: Any, where: str, vocab: int | None) -> list[SparseDist] | None:
        return None if v is None else unpack_dists(expect_bytes(v, where), where, vocab)

    return FieldCodec(enc=enc, dec=dec)


# ---- the two handshake dicts --------------------------------------------------------------


def _check_fingerprint(v: Any, where: str) -> dict[str, Any]:
    """{"vocab_size", "bos_id", "eos_id", "tokens_sha256", "n_tokens"} plus a few extra scalars.

    Extra keys are tolerated (bounded, scalar) so the models package can describe a tokenizer
    further without a protocol bump; the server compares what it cares about.
    """
    if not isinstance(v, dict):
        fail(where, f"expected a map, got {type(v).__name__}")
    out = {
        "vocab_size": as_int(v.get("vocab_size"), f"{where}.vocab_size", 1, MAX_VOCAB),
        "bos_id": optional(as_int)(v.get("bos_id"), f"{where}.bos_id", 0, MAX_VOCAB - 1),
        "eos_id": optional(as_int)(v.get("eos_id"), f"{where}.eos_id", 0, MAX_VOCAB - 1),
        "tokens_sha256": as_str(v.get("tokens_sha256"), f"{where}.tokens_sha256", 128),
        "n_tokens": as_int(v.get("n_tokens"), f"{where}.n_tokens", 0, MAX_VOCAB),
    }
    extra = [k for k in v if k not in out]
    if len(extra) > MAX_EXTRA_KEYS:
        fail(where, f"{len(extra)} extra keys, limit {MAX_EXTRA_KEYS}")
    for key in extra:
        as_str(key, f"{where} key", 64)
        out[key] = _scalar(v[key], f"{where}.{key}")
    return out


def _scalar(v: Any, where: str) -> Any:
    if v is None or isinstance(v, (bool, np.bool_)):
        return None if v is None else bool(v)
    if isinstance(v, (int, np.integer)):
        return as_int(v, where, -MAX_UINT - 1, MAX_UINT)
    if isinstance(v, (float, np.floating)):
        return as_float(v, where, -math.inf, math.inf)
    return as_str(v, where, MAX_NAME)


SAMPLING_KEYS = ("temperature", "top_p", "top_k", "seed")


def _check_sampling(v: Any, where: str) -> dict[str, Any]:
    """Exactly SamplingParams' four fields: an unknown knob would silently sample differently."""
    if not isinstance(v, dict):
        fail(where, f"expected a map, got {type(v).__name__}")
    if set(v) != set(SAMPLING_KEYS):
        fail(where, f"keys {sorted(map(str, v))}, expected {sorted(SAMPLING_KEYS)}")
    return {
        "temperature": as_float(v["temperature"], f"{where}.temperature", 0.0, math.inf),
        "top_p": as_float(v["top_p"], f"{where}.top_p", 0.0, 1.0, lo_open=True),
        "top_k": as_int(v["top_k"], f"{where}.top_k", 0, MAX_VOCAB),
        "seed": optional(as_int)(v["seed"], f"{where}.seed", 0, MAX_SEED),
    }


def fingerprint() -> FieldCodec:
    return same_both_ways(_check_fingerprint)


def sampling() -> FieldCodec:
    return same_both_ways(_check_sampling)

