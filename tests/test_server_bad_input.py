"""Bad input at the real server (tiny model, real sockets): every refusal is an Error message with
a code that says why, sent before the close; only the session that sent it ends, and a second,
healthy session keeps answering correctly the whole time.
"""
from __future__ import annotations

import asyncio

import msgpack
import pytest
import zstandard

import codec
from cloud.engine import TargetEngine
from cloud.server import ServerConfig
from edge_app.link import CloudError
from edge_app.pipeline import GenerateOptions
from picospec.api import generate_async
from tests.tiny import SlowEngine, TinyDrafter, fingerprint, perturbed, tiny_model
from tests.tiny_edge import (
    NO_STOP,
    Commits,
    HealthySession,
    Verifier,
    errors,
    hello_frame,
    open_link,
    raw_session,
    reference,
    tiny_client,
)

PROMPT = codec.encode(codec.Prompt(ids=[1, 2, 3], max_new_tokens=8))


@pytest.fixture(scope="module")
def target():
    return tiny_model(0)


@pytest.fixture(scope="module")
def verifier(target):
    with Verifier(TargetEngine(target), ServerConfig(port=0, hello_timeout_s=0.3)) as v:
        yield v


@pytest.fixture(scope="module")
def healthy(verifier, target):
    """The other edge: answering throughout the module, checked at its end."""
    with HealthySession(verifier.url, target) as h:
        yield h
    h.check(min_answers=1)


def refused(url: str, frames: list, hello: bytes | None = None, wait_s: float = 5.0) -> list[str]:
    return errors(asyncio.run(raw_session(url, frames, hello=hello, wait_s=wait_s)))


def body_frame(body: dict) -> bytes:
    """A plain frame around any msgpack map (to say what encode would never say)."""
    return b"\x00" + msgpack.packb(body, use_bin_type=True)


def zstd_bomb(size: int) -> bytes:
    """A few kB that say they inflate to `size` bytes (and do)."""
    return b"\x01" + zstandard.ZstdCompressor(level=1).compress(b"\x00" * size)


def streamed_bomb(size: int) -> bytes:
    """The same without a content size in its header: the decoder must bound it by reading."""
    cobj = zstandard.ZstdCompressor(level=1, write_content_size=False).compressobj()
    return b"\x01" + cobj.compress(b"\x00" * size) + cobj.flush()


CASES = {
    # name: (frames after a good hello, or None for a bad hello given instead, expected code)
    "truncated frame": ([codec.encode(codec.Prompt(ids=list(range(60)), max_new_tokens=5))[:-7]], "bad_frame"),
    "garbage": ([b"\x07this is not a frame"], "bad_frame"),
    "garbage msgpack": ([b"\x00\xc1\xc1\xc1"], "bad_frame"),
    "text frame": (["hello?"], "bad_frame"),
    "zstd bomb (stated size)": ([zstd_bomb(64 << 20)], "too_large"),
    "zstd bomb (streamed)": ([streamed_bomb(64 << 20)], "too_large"),
    "wrong version": ([body_frame({"v": 99, "t": 7, "n": 1})], "bad_version"),
    "unknown message type": ([body_frame({"v": codec.PROTOCOL_VERSION, "t": 77})], "bad_message"),
    "msgpack ext type": ([b"\x00" + msgpack.packb(msgpack.ExtType(1, b"x" * 8))], "bad_frame"),
    "out-of-range prompt id": ([codec.encode(codec.Prompt(ids=[1, 2, 64], max_new_tokens=4))], "bad_message"),
    "out-of-range draft id": ([PROMPT, codec.encode(codec.Draft(epoch=1, pos=3, ids=[5, 999]))], "bad_message"),
    "draft before prompt": ([codec.encode(codec.Draft(epoch=0, pos=0, ids=[5]))], "bad_message"),
    "generate before prompt": ([codec.encode(codec.Generate(max_new_tokens=4))], "bad_message"),
    "draft at a wrong position": ([PROMPT, codec.encode(codec.Draft(epoch=1, pos=7, ids=[5]))], "bad_message"),
    "forced token at a wrong time": ([PROMPT, codec.encode(codec.Draft(epoch=1, pos=3, ids=[5, 6], forced=1))],
                                     "bad_message"),
    "empty draft": ([PROMPT, codec.encode(codec.Draft(epoch=1, pos=3, ids=[]))], "bad_message"),
    "prompt past the context": ([codec.encode(codec.Prompt(ids=[1] * 500, max_new_tokens=100))], "too_large"),
    "huge max_new_tokens": ([codec.encode(codec.Prompt(ids=[1, 2], max_new_tokens=1 << 40))], "too_large"),
    "a second hello": ([hello_frame()], "bad_message"),
    "a verdict from the edge": ([PROMPT, codec.encode(codec.Verdict(epoch=1, pos=3, accepted=0, token=4,
                                                                    kind="recovered", new_epoch=2))],
                                "bad_message"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gets_its_error_and_the_other_session_keeps_working(verifier, healthy, case):
    frames, code = CASES[case]
    assert refused(verifier.url, frames, hello=hello_frame()) == [code]
    assert healthy.error is None


@pytest.mark.parametrize("hello,code", [
    (hello_frame(fingerprint(vocab=100)), "model_mismatch"),  # a draft with another vocabulary
    (hello_frame(fingerprint(eos=5)), "model_mismatch"),
    (codec.encode(codec.Prompt(ids=[1], max_new_tokens=1)), "bad_message"),  # no hello first
    (b"\x01\x28\xb5\x2f\xfd garbage", "bad_frame"),
])
def test_bad_hello_is_refused(verifier, healthy, hello, code):
    assert refused(verifier.url, [], hello=hello) == [code]


def test_a_client_that_says_nothing_times_out(verifier, healthy):
    assert refused(verifier.url, [], hello=None, wait_s=3) == ["timeout"]


def test_oversized_message_is_refused_with_its_code(verifier, healthy):
    assert refused(verifier.url, [b"\x00" + bytes(codec.MAX_FRAME + 10)], hello=hello_frame()) == ["too_large"]


def test_stale_drafts_are_dropped_and_the_session_goes_on(verifier, healthy):
    """A draft of an old epoch is not an error (it crossed a rejection in flight)."""
    got = asyncio.run(raw_session(verifier.url, [
        PROMPT, codec.encode(codec.Draft(epoch=0, pos=3, ids=[5, 6])),
        codec.encode(codec.Draft(epoch=99, pos=3, ids=[5])), codec.encode(codec.Generate(max_new_tokens=2))],
        hello=hello_frame(), wait_s=1.0))
    assert errors(got) == []
    assert [type(m).__name__ for m in got] == ["Welcome", "Prefilled", "Tokens", "Tokens"]


def test_the_healthy_session_was_served_throughout(healthy):
    healthy.check(min_answers=1)


# -- limits ---------------------------------------------------------------------------------
def test_wrong_token_is_unauthorized_and_each_token_has_its_own_session_cap(target):
    config = ServerConfig(port=0, token="alpha-secret", tokens=("beta-secret",), max_sessions_per_token=2)
    with Verifier(TargetEngine(target), config) as v:
        assert refused(v.url, [], hello=hello_frame(token="alpha-secreT")) == ["unauthorized"]
        assert refused(v.url, [], hello=hello_frame()) == ["unauthorized"]

        async def sessions():
            a1 = await open_link(v.url, token="alpha-secret")
            a2 = await open_link(v.url, token="alpha-secret")
            with pytest.raises(CloudError) as third:
                await open_link(v.url, token="alpha-secret")
            b1 = await open_link(v.url, token="beta-secret")  # another fleet is not crowded out
            await a1.close()
            await asyncio.sleep(0.2)
            a3 = await open_link(v.url, token="alpha-secret")  # a freed slot is usable again
            for link in (a2, b1, a3):
                await link.close()
            return third.value.code

        assert asyncio.run(sessions()) == "overloaded"


def test_an_open_server_caps_sessions_per_peer_address(target):
    with Verifier(TargetEngine(target), ServerConfig(port=0, max_sessions_per_token=1)) as v:
        async def two():
            first = await open_link(v.url)
            try:
                await open_link(v.url)
            except CloudError as err:
                return err.code
            finally:
                await first.close()
        assert asyncio.run(two()) == "overloaded"


def test_message_flood_is_rate_limited(target):
    with Verifier(TargetEngine(target), ServerConfig(port=0, msgs_per_s=5, msg_burst=5)) as v:
        assert refused(v.url, [codec.encode(codec.Draft(epoch=7, pos=0, ids=[1]))] * 40,
                       hello=hello_frame()) == ["rate_limited"]
        assert "picospec_rate_limited_total 1" in v.server.metrics.render().splitlines()


def test_too_much_queued_work_is_refused(target):
    engine = SlowEngine(target)
    engine.delay_s = 0.05
    config = ServerConfig(port=0, max_queued_msgs=8, msgs_per_s=0)
    with Verifier(engine, config) as v:
        assert refused(v.url, [PROMPT] * 60, hello=hello_frame()) == ["overloaded"]


def test_rate_limited_mid_answer_the_edge_keeps_what_was_committed(target):
    """The API raises CloudError, and every token committed before it reached on_commit."""
    expected = reference(target, [5, 9, 11], 60)
    with Verifier(TargetEngine(target), ServerConfig(port=0, msgs_per_s=10, msg_burst=12)) as v:
        client = tiny_client(v.url, TinyDrafter(perturbed(target, 0.0)))
        commits = Commits()

        async def go():
            try:
                return await generate_async(client, [5, 9, 11], on_commit=commits, options=GenerateOptions(
                    max_new_tokens=60, block=1, run_ahead=1, stop_ids=NO_STOP))
            finally:
                client.drafter = None
                await client.close()

        with pytest.raises(CloudError) as info:
            asyncio.run(go())
    assert info.value.code == "rate_limited"
    assert 0 < len(commits.ids) < 60 and commits.ids == expected[:len(commits.ids)]
