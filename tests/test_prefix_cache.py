"""Prompt openings shared across sessions (cloud/prefix_cache.py, Prompt.shared): a second
conversation with the same system turn prefills only what follows it, and its answer and logits are
bit for bit those of a fresh prefill."""
from __future__ import annotations

import urllib.request

import pytest
import torch

import codec
from cloud.engine import TargetEngine
from cloud.prefix_cache import PrefixStore, kv_nbytes
from cloud.server import ServerConfig
from edge_app.repl import LoopThread
from edge_app.template import chat_ids, opening_len
from tests.tiny import ServerThread, TinyDrafter, perturbed, tiny_model
from tests.tiny_edge import reference, tiny_client


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def rows(n: int, width: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two layers of n positions: 2 x 2 x n x width float32 values."""
    return [(torch.zeros(1, 1, n, width), torch.zeros(1, 1, n, width)) for _ in range(2)]


# -- the store ------------------------------------------------------------------------------

def test_store_matches_whole_openings_only_and_leaves_a_row_to_feed():
    store = PrefixStore(1 << 20)
    assert store.put([1, 2, 3], rows(3))
    assert store.match([1, 2, 3, 9, 9], limit=4)[0] == 3
    assert store.match([1, 2, 7, 9], limit=3) == (0, None)  # shares only part of it: not declared shared
    assert store.match([1, 2, 3], limit=2) == (0, None)  # the prompt is the opening: its last id is fed
    assert store.put([1, 2, 3, 4, 5], rows(5))
    n, opening = store.match([1, 2, 3, 4, 5, 6], limit=5)
    assert n == 5 and opening.ids == (1, 2, 3, 4, 5)  # the longest one


def test_openings_are_shared_within_their_scope_only():
    store = PrefixStore(1 << 20)
    assert store.put([1, 2, 3], rows(3), scope="token#0")
    assert store.match([1, 2, 3, 4], limit=3, scope="token#1") == (0, None)  # another fleet's token
    assert store.match([1, 2, 3, 4], limit=3)[0] == 0
    assert store.match([1, 2, 3, 4], limit=3, scope="token#0")[0] == 3


def test_store_stays_within_its_bytes_dropping_the_least_recently_used():
    one = kv_nbytes(rows(4))
    store = PrefixStore(2 * one)
    assert store.put([1, 1, 1, 1], rows(4)) and store.put([2, 2, 2, 2], rows(4))
    store.match([1, 1, 1, 1, 5], limit=4)  # opening 1 is used again: opening 2 is now the oldest
    assert store.put([3, 3, 3, 3], rows(4))
    assert store.nbytes <= store.max_bytes and len(store) == 2
    assert store.holds([1, 1, 1, 1]) and store.holds([3, 3, 3, 3]) and not store.holds([2, 2, 2, 2])
    assert not store.put([4] * 12, rows(12))  # larger than the whole budget: refused, nothing dropped
    assert len(store) == 2


def test_prompt_shared_is_checked_on_the_wire():
    frame = codec.encode(codec.Prompt(ids=[5, 6, 7], max_new_tokens=2, shared=2))
    assert codec.decode(frame).shared == 2
    with pytest.raises(codec.CodecError, match="shared"):
        codec.encode(codec.Prompt(ids=[5, 6], max_new_tokens=2, shared=3))


# -- the edge's side: what a chat prompt shares ---------------------------------------------

def chars(text: str, add_bos: bool = False) -> list[int]:
    return [ord(c) for c in text]


@pytest.mark.parametrize("template", [None, "{% for m in messages %}[{{ m['role'] }}]: {{ m['content'] }}\n{% endfor %}"
                                            "{% if add_generation_prompt %}[assistant]: {% endif %}"])
def test_opening_is_everything_before_the_first_user_text(template):
    for system in ([], [{"role": "system", "content": "Be brief."}]):
        messages = system + [{"role": "user", "content": "What is 2 + 2?"}]
        ids = chat_ids(messages, template, chars)
        n = opening_len(messages, ids, template, chars)
        text = "".join(map(chr, ids))
        assert text[n:].startswith("What is 2 + 2?")
        if system:
            assert "Be brief." in text[:n]


def test_client_remembers_a_few_openings_and_names_the_longest_a_prompt_starts_with():
    from edge_app.client import MAX_OPENINGS

    client = tiny_client("ws://127.0.0.1:1/ws", TinyDrafter(tiny_model(0)))
    client.drafter.tokenize = chars
    plain = client.encode_chat([{"role": "user", "content": "hi"}])
    briefed = client.encode_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert 0 < client.opening_of(plain) < client.opening_of(briefed)
    assert "".join(map(chr, briefed[:client.opening_of(briefed)])).endswith("user\n")
    assert client.opening_of(chars("raw text, no template")) == 0
    for i in range(MAX_OPENINGS - 1):  # one opening too many: the oldest is forgotten
        client.encode_chat([{"role": "system", "content": f"rule {i}"}, {"role": "user", "content": "x"}])
    assert client.opening_of(plain) == 0 and client.opening_of(briefed) > 0


# -- end to end, tiny model over a real socket ----------------------------------------------

@pytest.fixture()
def loop():
    runner = LoopThread()
    yield runner
    runner.close()


def test_second_conversation_prefills_only_what_follows_the_opening(loop):
    target = tiny_model(0)
    system = [{"role": "system", "content": "You are terse."}]
    questions = ["first question", "another one"]
    with ServerThread(TargetEngine(target)) as server:
        client = tiny_client(server.url, TinyDrafter(perturbed(target, 0.5)))
        client.drafter.tokenize = lambda text, add_bos=False: [10 + ord(c) % 50 for c in text]
        prompts = [client.encode_chat(system + [{"role": "user", "content": q}]) for q in questions]
        shared = client.opening_of(prompts[0])
        assert shared == client.opening_of(prompts[1]) > 0
        outs, prefilled = [], []
        for ids in prompts:
            before = metric(server.port, "picospec_prefill_tokens_total")
            answer = loop.call(client.generate_ids(ids, _options(8)))
            prefilled.append(metric(server.port, "picospec_prefill_tokens_total") - before)
            outs.append(answer.token_ids)
            loop.call(_drop(client))  # a new session per conversation: the store is the verifier's
        hits = metric(server.port, "picospec_prefix_hits_total")
        reused = metric(server.port, "picospec_prefix_reused_tokens_total")
    assert outs == [reference(target, ids, 8) for ids in prompts]
    assert prefilled == [len(prompts[0]), len(prompts[1]) - shared]
    assert hits == 1 and reused == shared


def test_store_off_prefills_whole_prompts(loop):
    target = tiny_model(0)
    with ServerThread(TargetEngine(target), ServerConfig(port=0, prefix_cache_bytes=0)) as server:
        client = tiny_client(server.url, TinyDrafter(perturbed(target, 0.5)))
        client.drafter.tokenize = lambda text, add_bos=False: [10 + ord(c) % 50 for c in text]
        prompts = [client.encode_chat([{"role": "user", "content": q}]) for q in ("one", "two")]
        for ids in prompts:
            loop.call(client.generate_ids(ids, _options(4)))
            loop.call(_drop(client))
        assert metric(server.port, "picospec_prefill_tokens_total") == sum(map(len, prompts))
        assert metric(server.port, "picospec_prefix_hits_total") == 0


def _options(n: int):
    from edge_app.pipeline import GenerateOptions

    return GenerateOptions(max_new_tokens=n, mode="pipeline")


async def _drop(client) -> None:
    if client.link is not None:
        await client.link.close()
        client.link = None


# -- the real target: copied rows give bit for bit a fresh prefill's logits -----------------

@pytest.mark.slow
def test_real_target_logits_after_a_copied_opening_are_bit_for_bit_a_fresh_prefills(real_target):
    g = torch.Generator().manual_seed(3)
    opening = torch.randint(0, real_target.vocab_size, (24,), generator=g).tolist()
    first = opening + torch.randint(0, real_target.vocab_size, (40,), generator=g).tolist()
    second = opening + torch.randint(0, real_target.vocab_size, (17,), generator=g).tolist()
    engine = real_target.fork()
    engine.prefill(first)  # the opening's rows computed inside a longer prompt
    kv = engine.export_rows(len(opening))
    engine.reset()
    fresh = engine.prefill(second)
    fresh_next = engine.forward([11, 12, 13])
    engine.import_rows(kv)
    copied = engine.prefill(second[len(opening):])
    copied_next = engine.forward([11, 12, 13])
    assert torch.equal(fresh, copied) and torch.equal(fresh_next, copied_next)
