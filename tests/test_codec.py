"""The wire protocol: round trips, sizes, and a decoder that refuses what a stranger might send."""
from __future__ import annotations

import math
import subprocess
import sys
import time
import tracemalloc

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codec import (
    MAX_BLOCK,
    MAX_DECOMPRESSED,
    MAX_FRAME,
    MAX_SUPPORT,
    MAX_TOP_K,
    MAX_WEIGHT,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    Close,
    CodecError,
    Draft,
    Error,
    Generate,
    Hello,
    Prefilled,
    Prompt,
    Tokens,
    Verdict,
    Welcome,
    decode,
    draft_bytes,
    encode,
    error_message,
)
from codec.packing import pack_dists, pack_floats, pack_varints
from sampling import SamplingParams, SparseDist, draft_dist, sample_sparse

VOCAB = 151936  # a Qwen-sized vocabulary: ids need 3 varint bytes, msgpack would spend 5
BOUNDED = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def dist(ids: list[int], weights: list[int]) -> SparseDist:
    return SparseDist(np.array(ids, dtype=np.int64), np.array(weights, dtype=np.int64))


def raw(body: dict, tag: int = 0) -> bytes:
    """A hand-made frame: lets a test put on the wire what encode would refuse to."""
    packed = msgpack.packb(body, use_bin_type=True)
    return bytes([tag]) + (packed if tag == 0 else zstandard.ZstdCompressor().compress(packed))


def refused(frame: bytes, code: str, **kw) -> CodecError:
    with pytest.raises(CodecError) as info:
        decode(frame, **kw)
    assert info.value.code == code, str(info.value)
    return info.value


def unsendable(*msgs) -> None:
    """encode refuses each message: a bad message fails at the side that made it."""
    for msg in msgs:
        with pytest.raises(CodecError) as info:
            encode(msg)
        assert info.value.code == "bad_message", msg


def draft(ids, **kw) -> Draft:
    return Draft(epoch=0, pos=0, ids=ids, **kw)


def verdict(token=None, kind="accepted", **kw) -> Verdict:
    return Verdict(**{"epoch": 0, "pos": 0, "accepted": 0, "new_epoch": 0, **kw},
                   token=token, kind=kind)


def wire_draft(**fields) -> bytes:
    """A hand-made Draft frame with one drafted id (4) unless fields say otherwise."""
    return raw({"v": PROTOCOL_VERSION, "t": 5, "e": 0, "p": 0, "i": pack_varints(np.array([4])), **fields})


# ---- strategies ---------------------------------------------------------------------------

token_ids = st.integers(0, VOCAB - 1)
counters = st.integers(0, 2**63 - 1)
durations = st.floats(0.0, 1e6, allow_nan=False, allow_infinity=False)
names = st.text(max_size=40)


@st.composite
def sparse_dists(draw, max_support: int = 50) -> SparseDist:
    ids = sorted(draw(st.sets(token_ids, min_size=1, max_size=max_support)))
    weights = draw(st.lists(st.integers(1, MAX_WEIGHT), min_size=len(ids), max_size=len(ids)))
    return dist(ids, weights)


fingerprints = st.fixed_dictionaries(
    {
        "vocab_size": st.integers(1, 2**31),
        "bos_id": st.none() | token_ids,
        "eos_id": st.none() | token_ids,
        "tokens_sha256": st.text("0123456789abcdef", min_size=64, max_size=64),
        "n_tokens": st.integers(0, 2**31),
    },
    optional={"name": names, "kind": st.sampled_from(["bpe", "spm"])},
)
samplings = st.fixed_dictionaries(
    {
        "temperature": st.floats(0.0, 10.0),
        "top_p": st.floats(0.0, 1.0, exclude_min=True),
        "top_k": st.integers(0, 1000),
        "seed": st.none() | st.integers(0, 2**64 - 1),
    }
)


@st.composite
def drafts(draw) -> Draft:
    mode = draw(st.sampled_from(["greedy", "exact", "paper"]))
    n = draw(st.integers(0 if mode == "greedy" else 1, 16))
    dists = q_scalar = None
    if mode == "exact":
        dists = [draw(sparse_dists()) for _ in range(n)]
        ids = [int(draw(st.sampled_from(d.ids.tolist()))) for d in dists]
    else:
        ids = draw(st.lists(token_ids, min_size=n, max_size=n))
    if mode == "paper":
        q_scalar = draw(st.lists(st.floats(0.0, 1.0, exclude_min=True), min_size=n, max_size=n))
    return Draft(
        epoch=draw(counters), pos=draw(counters), ids=ids, dists=dists, q_scalar=q_scalar,
        forced=draw(st.integers(0, min(1, n))), seq=draw(counters),
        wait=draw(st.booleans()),
    )


@st.composite
def verdicts(draw) -> Verdict:
    kind = draw(st.sampled_from(["accepted", "recovered", "bonus", "recover_on_edge"]))
    token = draw(token_ids) if kind in ("recovered", "bonus") else None
    top_ids = top_probs = None
    if draw(st.booleans()):
        k = draw(st.integers(0, 16))
        top_ids = draw(st.lists(token_ids, min_size=k, max_size=k))
        top_probs = draw(st.lists(st.floats(0.0, 1.0), min_size=k, max_size=k))
    return Verdict(
        epoch=draw(counters), pos=draw(counters), accepted=draw(st.integers(0, MAX_BLOCK)),
        token=token, kind=kind, new_epoch=draw(counters), verify_s=draw(durations),
        top_ids=top_ids, top_probs=top_probs, seq=draw(counters),
    )


MESSAGE_STRATEGIES = {
    Hello: st.builds(Hello, fingerprint=fingerprints, sampling=samplings,
                     variant=st.sampled_from(["exact", "paper"]),
                     paper_top_k=st.integers(1, MAX_TOP_K), token=st.none() | names, client=names),
    Welcome: st.builds(Welcome, session_id=names, fingerprint=fingerprints, model=names,
                       vocab_size=st.integers(1, 2**31), server=names),
    Prompt: st.builds(Prompt, ids=st.lists(token_ids, max_size=300), max_new_tokens=counters),
    Prefilled: st.builds(Prefilled, committed_len=counters, epoch=counters, prefill_s=durations),
    Draft: drafts(),
    Verdict: verdicts(),
    Generate: st.builds(Generate, max_new_tokens=counters),
    Tokens: st.builds(Tokens, pos=counters, ids=st.lists(token_ids, max_size=300),
                      done=st.booleans()),
    Error: st.builds(Error, code=st.text(max_size=64), message=st.text(max_size=200)),
    Close: st.builds(Close, reason=names),
}
messages = st.one_of(*MESSAGE_STRATEGIES.values())


# ---- round trips --------------------------------------------------------------------------


@BOUNDED
@given(messages)
def test_every_message_round_trips(msg):
    frame = encode(msg)
    assert decode(frame) == msg
    assert decode(frame, vocab_size=VOCAB) == msg
    assert decode(bytearray(frame)) == msg and decode(memoryview(frame)) == msg


def test_each_message_type_is_covered():
    assert set(MESSAGE_STRATEGIES) == set(MESSAGE_TYPES)


def test_numpy_inputs_encode_and_come_back_as_plain_python():
    d = dist([3, 9], [5, 1])
    msg = Draft(epoch=np.int64(1), pos=np.uint32(7), ids=np.array([9, 3]),
                dists=[d, dist([3], [1])])
    back = decode(encode(msg))
    assert back.ids == [9, 3] and all(type(x) is int for x in back.ids)
    assert back.epoch == 1 and type(back.epoch) is int
    assert back.dists[0] == d and back.dists[0].ids.dtype == np.int64


def test_limits_are_a_few_mib_and_full_blocks_fit():
    assert PROTOCOL_VERSION in SUPPORTED_VERSIONS
    assert MAX_FRAME <= 8 << 20 and MAX_DECOMPRESSED <= 8 << 20
    ids = list(range(MAX_BLOCK))
    wide = [dist(list(range(i, i + 4096)), [1] * 4096) for i in ids]  # every weight 1 of 4096
    assert decode(encode(Draft(epoch=0, pos=0, ids=ids, dists=wide))).dists == wide


# ---- bytes on the wire --------------------------------------------------------------------


def test_greedy_draft_is_small():
    msg = Draft(epoch=3, pos=1234, ids=[151000, 100000, 20000, 5], seq=77)
    size = draft_bytes(msg)
    print(f"\ngreedy 4-token Draft: {size} bytes ({size / 4:.1f} per drafted token)")
    assert size < 40
    assert draft_bytes(Draft(epoch=0, pos=17, ids=[271, 3555, 11, 279])) < 30


def _realistic_dists(rng, vocab: int, params: SamplingParams, n: int) -> tuple[list[int], list]:
    """n draft distributions from logits with a handful of strong candidates over noise."""
    ids, dists = [], []
    for _ in range(n):
        logits = rng.standard_normal(vocab)
        lead = rng.choice(vocab, int(rng.integers(3, 40)), replace=False)
        logits[lead] += rng.uniform(6.0, 11.0, len(lead))
        d = draft_dist(logits, params)
        dists.append(d)
        ids.append(sample_sparse(d, rng))
    return ids, dists


@pytest.mark.parametrize("vocab", [32000, VOCAB])
def test_sampled_draft_bytes_per_token(vocab):
    rng = np.random.default_rng(7)
    params = SamplingParams(temperature=0.8, top_p=0.9)
    sizes, supports = [], []
    for _ in range(8):
        ids, dists = _realistic_dists(rng, vocab, params, 4)
        msg = Draft(epoch=2, pos=300 + len(sizes), ids=ids, dists=dists, seq=len(sizes))
        assert decode(encode(msg), vocab_size=vocab) == msg
        sizes.append(draft_bytes(msg))
        supports.append(sum(len(d.ids) for d in dists))
    per_entry = (sum(sizes) - 20 * len(sizes)) / sum(supports)
    print(
        f"\nsampled 4-token Draft, vocab {vocab}: median {np.median(sizes):.0f} bytes "
        f"({np.median(sizes) / 4:.0f} per drafted token), supports {min(supports) // 4}.."
        f"{max(supports) // 4} per token, {per_entry:.2f} bytes per support entry"
    )
    assert 5 <= np.median(supports) / 4 <= 50  # the setup really is top-p-0.9-realistic
    assert per_entry < 5.0  # a dense float32 row would be 4 * vocab bytes per token
    paper = Draft(epoch=2, pos=300, ids=ids, q_scalar=[d.prob(t) for t, d in zip(ids, dists)])
    print(f"paper variant, same block: {draft_bytes(paper)} bytes")
    assert draft_bytes(paper) < 70


def test_encode_picks_the_smaller_frame():
    small = encode(Close())
    assert small[0] == 0 and len(small) < 10  # zstd's own header would cost more
    prompt = Prompt(ids=[1, 2, 3, 4] * 2000, max_new_tokens=128)
    frame = encode(prompt)
    assert frame[0] == 1 and len(frame) < len(pack_varints(np.array(prompt.ids))) // 10
    assert decode(frame) == prompt


# ---- hostile bytes ------------------------------------------------------------------------


def _decode_or_codec_error(frame: bytes) -> None:
    try:
        decode(frame, vocab_size=VOCAB)
    except CodecError as exc:
        assert exc.code in ("too_large", "bad_frame", "bad_version", "bad_message")
        assert str(exc).startswith(exc.code)


@BOUNDED
@given(st.binary(max_size=300), st.sampled_from([b"", b"\x00", b"\x01", b"\x01\x28\xb5\x2f\xfd"]))
def test_garbage_raises_only_codec_error(junk, prefix):
    _decode_or_codec_error(prefix + junk)


@BOUNDED
@given(messages, st.data())
def test_mutated_frames_raise_only_codec_error(msg, data):
    frame = bytearray(encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(frame) - 1))
        frame[i] = data.draw(st.integers(0, 255))
    _decode_or_codec_error(bytes(frame))


msgpack_scalars = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=5) | st.binary(max_size=5)
)
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=3), kids,
                                                              max_size=4),
    max_leaves=12,
)


@settings(BOUNDED, max_examples=100)
@given(msgpack_values)
def test_arbitrary_msgpack_raises_only_codec_error(body):
    _decode_or_codec_error(raw({"v": PROTOCOL_VERSION, "t": 5, "i": body}))
    _decode_or_codec_error(raw(body))


def test_not_bytes_is_a_bad_frame():
    for thing in ("text", None, 42, [0, 1]):
        with pytest.raises(CodecError) as info:
            decode(thing)
        assert info.value.code == "bad_frame"


@pytest.mark.parametrize("msg", [
    draft([5, 6, 7], dists=[dist([5], [1]), dist([1, 6], [3, 4]), dist([7], [9])]),
    Prompt(ids=list(range(0, 6000, 3)), max_new_tokens=9),  # zstd-framed
])
def test_truncated_frames_are_refused(msg):
    frame = encode(msg)
    for cut in range(len(frame)):
        with pytest.raises(CodecError) as info:
            decode(frame[:cut])
        assert info.value.code in ("bad_frame", "bad_message")


def test_trailing_data_is_refused():
    plain, packed = encode(Generate(5)), encode(Prompt(ids=[1, 2] * 500, max_new_tokens=1))
    assert packed[0] == 1
    refused(plain + b"\x00", "bad_frame")
    refused(packed + b"\x00", "bad_frame")
    refused(packed + packed[1:], "bad_frame")  # a second zstd frame
    empty_frame = zstandard.ZstdCompressor().compress(b"")
    refused(packed + empty_frame, "bad_frame")


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    """100 MB of zeros as zstd, with the size in the header, without it, and with a lie."""
    chunk = bytes(1 << 20)  # fed a MiB at a time: the test never holds the 100 MB either

    def squeeze(**size: int) -> bytes:
        stream = zstandard.ZstdCompressor().compressobj(**size)
        return b"".join(stream.compress(chunk) for _ in range(100)) + stream.flush()

    with_size, without = squeeze(size=100 << 20), squeeze()
    head = zstandard.frame_header_size(without)
    # the same blocks under a header that states 100 bytes (Frame_Content_Size_flag = 2: 4 bytes)
    fhd = bytes([without[4] | 0x80])
    lying = without[:4] + fhd + without[5:head] + (100).to_bytes(4, "little") + without[head:]
    assert zstandard.frame_content_size(with_size) == 100 << 20
    assert zstandard.frame_content_size(without) == -1
    assert zstandard.frame_content_size(lying) == 100
    return {"with_size": with_size, "without_size": without, "lying": lying}


@pytest.mark.parametrize("kind", ["with_size", "without_size", "lying"])
def test_zstd_bomb_is_refused_quickly_without_inflating_it(bombs, kind):
    frame = b"\x01" + bombs[kind]
    assert len(frame) < 10_000  # tiny on the wire ...
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(CodecError) as info:
            decode(frame)
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.code in (("bad_frame",) if kind == "lying" else ("too_large",))
    assert elapsed < 1.0
    assert peak < MAX_DECOMPRESSED + (1 << 20)  # ... and never more than the limit in memory


def test_decompressed_limit_is_the_callers():
    frame = encode(Prompt(ids=[7] * 5000, max_new_tokens=1))
    assert frame[0] == 1
    refused(frame, "too_large", max_decompressed=1000)
    refused(encode(Generate(1)), "too_large", max_decompressed=3)  # plain bodies too


def test_oversized_frames_are_refused_before_parsing():
    refused(b"\x07" + bytes(MAX_FRAME), "too_large")  # unknown tag, but size is checked first
    prompt = encode(Prompt(ids=list(range(0, 3000, 30)), max_new_tokens=1))
    refused(prompt, "too_large", max_frame=50)
    refused(memoryview(np.zeros(MAX_FRAME // 4, dtype=np.int64)), "too_large")


def test_oversized_messages_fail_at_the_sender():
    spread = dist(list(range(0, MAX_SUPPORT * 9000, 9000)), [MAX_WEIGHT] * MAX_SUPPORT)
    huge = Draft(epoch=0, pos=0, ids=[0] * MAX_BLOCK, dists=[spread] * MAX_BLOCK)
    with pytest.raises(CodecError) as info:
        encode(huge)
    assert info.value.code == "too_large"


def test_unknown_frame_tag_and_short_frames():
    refused(b"\x05" + msgpack.packb({"v": PROTOCOL_VERSION, "t": 7, "n": 1}), "bad_frame")
    refused(b"", "bad_frame")
    refused(b"\x00", "bad_frame")
    refused(b"\x01\x00\x00\x00\x00\x00", "bad_frame")  # zstd tag, no zstd magic


def test_ext_types_and_deep_nesting_are_refused():
    refused(b"\x00" + msgpack.packb(msgpack.ExtType(1, b"x")), "bad_frame")
    refused(b"\x00" + b"\x91" * 5000 + b"\x01", "bad_frame")


# ---- versions -----------------------------------------------------------------------------


def test_wrong_version_says_which_versions_are_spoken():
    err = refused(raw({"v": 7, "t": 7, "n": 1}), "bad_version")
    assert err.message == "protocol version 7 not supported; this side speaks 4"
    assert str(err) == "bad_version: protocol version 7 not supported; this side speaks 4"
    assert "speaks 4" in refused(raw({"t": 7, "n": 1}), "bad_version").message
    refused(raw({"v": True, "t": 7, "n": 1}), "bad_version")
    refused(raw({"v": "2", "t": 7, "n": 1}), "bad_version")
    refused(raw({"v": 1, "t": 7, "n": 1}), "bad_version")  # version 1 had other verdict kinds
    refused(raw({"v": 2, "t": 7, "n": 1}), "bad_version")  # version 2 knew no branches
    refused(raw({"v": 3, "t": 7, "n": 1}), "bad_version")  # version 3 shared no prompt openings
    # the version is read before the type: a newer peer's new message types say "version"
    refused(raw({"v": PROTOCOL_VERSION + 1, "t": 99}), "bad_version")


def test_error_message_carries_a_codec_error_to_the_peer():
    err = refused(raw({"v": 9, "t": 7, "n": 1}), "bad_version")
    back = decode(encode(error_message(err)))
    assert back == Error(code="bad_version", message=err.message)


# ---- schema -------------------------------------------------------------------------------


def test_unknown_type_missing_and_unknown_fields():
    assert "type 99" in refused(raw({"v": PROTOCOL_VERSION, "t": 99}), "bad_message").message
    refused(raw({"v": PROTOCOL_VERSION, "t": True, "n": 1}), "bad_message")
    refused(raw({"v": PROTOCOL_VERSION}), "bad_message")
    refused(raw([1, 7, 1]), "bad_message")  # a message is a map
    assert "missing" in refused(raw({"v": PROTOCOL_VERSION, "t": 7}), "bad_message").message
    assert "unknown" in refused(raw({"v": PROTOCOL_VERSION, "t": 7, "n": 1, "zz": 0}), "bad_message").message
    assert decode(raw({"v": PROTOCOL_VERSION, "t": 7, "n": 1})) == Generate(1)
    assert decode(raw({"v": PROTOCOL_VERSION, "t": 7, "n": 1}, tag=1)) == Generate(1)


def test_out_of_range_ids_are_refused():
    for msg in (
        draft([5, 1000]),
        draft([999], dists=[dist([999, 1500], [1, 1])]),
        Prompt(ids=[1, 2, 5000], max_new_tokens=1),
        Tokens(pos=0, ids=[5000], done=True),
        verdict(token=1000, kind="recovered"),
        verdict(kind="recover_on_edge", top_ids=[3, 4000], top_probs=[0.5, 0.5]),
    ):
        decode(encode(msg))  # fine without a vocabulary ...
        refused(encode(msg), "bad_message", vocab_size=1000)  # ... not with one of 1000
    unsendable(draft([-1]), draft([2**31]), draft([1.0]), draft([True]), draft("abc"))


def test_zero_and_bad_weights_are_refused():
    bad_weights = ([0, 1], [-3, 1], [1, MAX_WEIGHT + 1])
    unsendable(*(draft([4], dists=[dist([4, 5], w)]) for w in bad_weights))
    unsendable(draft([4], dists=[SparseDist(np.array([4]), np.array([1.0]))]),
               draft([4], dists=[SparseDist(np.array([4]), np.array([True]))]))
    # on the wire, made by hand: n=2, ids 4 (+1), weights 0 and 1
    refused(wire_draft(d=pack_varints(np.array([2, 4, 1, 0, 1]))), "bad_message")


def test_malformed_dists_on_the_wire_are_refused():
    assert decode(wire_draft(d=pack_varints(np.array([1, 4, 7])))).dists == [dist([4], [7])]
    for values in (
        [2, 3, 0, 1, 1],  # gap 0: ids not ascending
        [0],  # empty support
        [3, 4, 1],  # runs past its bytes
        [MAX_SUPPORT + 1, 4],
    ):
        refused(wire_draft(d=pack_varints(np.array(values))), "bad_message")
    for d in (b"\x81", b"\x81\x00\x04\x07", b"\xff\xff\xff\xff\xff\x01", "text"):
        refused(wire_draft(d=d), "bad_message")  # truncated, non-minimal, over-long varints


def test_inconsistent_lengths_are_refused():
    a, b = dist([4], [1]), dist([5, 9], [1, 2])
    unsendable(
        draft([4, 5], dists=[a]),
        draft([4], q_scalar=[0.5, 0.5]),
        draft([4, 6], dists=[a, b]),  # 6 is not in its support
        draft([4], dists=[a], q_scalar=[1.0]),
        draft([], forced=1),
        draft([4, 5], forced=2),
        draft(list(range(MAX_BLOCK + 1))),
        verdict(top_ids=[1], top_probs=[]),
        verdict(top_ids=[1]),
        verdict(kind="bonus"),
        verdict(token=3),
        verdict(kind="weird"),
        verdict(accepted=MAX_BLOCK + 1),
    )
    # and on the wire, where the other side never ran encode
    refused(wire_draft(q=pack_floats(np.array([0.5, 0.5]))), "bad_message")
    refused(wire_draft(d=pack_dists([a, b])), "bad_message")


def test_bools_and_floats_do_not_pass_as_ints():
    unsendable(
        Draft(epoch=True, pos=0, ids=[1]),
        Draft(epoch=0, pos=1.0, ids=[1]),
        draft([1], forced=True),
        draft([1], wait=0),
        Generate(max_new_tokens=False),
        Tokens(pos=0, ids=[1], done=0),
        verdict(token=True, kind="bonus"),
    )
    wrong = (("e", True), ("p", 2.0), ("p", -1), ("p", 2**64 - 1), ("x", 1), ("s", None))
    for field, value in wrong:
        refused(wire_draft(**{field: value}), "bad_message")
    refused(raw({"v": PROTOCOL_VERSION, "t": 8, "p": 0, "i": b"", "z": 1}), "bad_message")


def test_floats_must_be_finite_and_in_range():
    unsendable(
        *(Prefilled(committed_len=1, epoch=0, prefill_s=x) for x in (math.nan, math.inf, -1.0)),
        *(draft([4], q_scalar=[x]) for x in (0.0, 1.5, math.nan)),
        verdict(kind="recover_on_edge", top_ids=[1], top_probs=[-0.1]),
    )
    refused(wire_draft(q=pack_floats(np.array([math.inf]))), "bad_message")
    refused(wire_draft(q=b"\x00" * 7), "bad_message")
    refused(raw({"v": PROTOCOL_VERSION, "t": 4, "c": 0, "e": 0, "ps": math.nan}), "bad_message")


def test_handshake_dicts_are_checked():
    fp = {"vocab_size": VOCAB, "bos_id": None, "eos_id": 2, "tokens_sha256": "ab" * 32,
          "n_tokens": VOCAB}
    sp = {"temperature": 0.7, "top_p": 0.9, "top_k": 0, "seed": 1}
    assert decode(encode(Hello(fp, sp))) == Hello(fp, sp)
    extra = {**fp, "name": "qwen", "merges": 3}  # bounded extra scalars pass through
    assert decode(encode(Hello(extra, sp))).fingerprint == extra
    without = lambda d, key: {k: v for k, v in d.items() if k != key}  # noqa: E731
    unsendable(*(Hello(bad, sp) for bad in (
        {**fp, "vocab_size": 0}, {**fp, "vocab_size": True}, {**fp, "eos_id": -1},
        {**fp, "tokens_sha256": 5}, {**fp, "nested": {"a": 1}}, without(fp, "n_tokens"),
    )))
    unsendable(*(Hello(fp, bad) for bad in (
        {**sp, "top_p": 0.0}, {**sp, "temperature": -1.0}, {**sp, "seed": -1},
        {**sp, "top_k": True}, {**sp, "min_p": 0.1}, without(sp, "seed"),
    )))
    unsendable(Hello(fp, sp, variant="fast"), Hello(fp, sp, paper_top_k=0),
               Hello(fp, sp, client="x" * 5000))


def test_overlong_strings_are_refused_on_both_sides():
    unsendable(Close(reason="x" * 2000), Error(code="x" * 65, message=""))
    refused(raw({"v": PROTOCOL_VERSION, "t": 10, "r": "x" * 2000}), "bad_message")
    refused(raw({"v": PROTOCOL_VERSION, "t": 10, "r": "x" * 100_000}), "bad_frame")  # over msgpack's own cap


def test_codec_error_is_readable():
    err = CodecError("too_large", "frame of 9 bytes, limit 3")
    assert (err.code, err.message) == ("too_large", "frame of 9 bytes, limit 3")
    assert str(err) == "too_large: frame of 9 bytes, limit 3"
    with pytest.raises(CodecError):
        encode("not a message")


def test_codec_imports_neither_side():
    sides = ("edge_app", "cloud", "torch", "transformers")
    probe = f"import sys, codec; print([m for m in sys.modules if m.split('.')[0] in {sides}])"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_branch_draft_round_trips_and_needs_a_seq_and_no_forced_id():
    branch = Draft(epoch=3, pos=40, ids=[5, 6], seq=7, root=99)
    assert decode(encode(branch)) == branch
    assert decode(encode(Verdict(epoch=3, pos=38, accepted=1, token=99, kind="recovered",
                                 new_epoch=4, branch=7))).branch == 7
    for bad in (dict(seq=0), dict(forced=1), dict(ids=[])):
        with pytest.raises(CodecError):
            encode(Draft(**{**dict(epoch=3, pos=40, ids=[5, 6], seq=7, root=99), **bad}))
