"""The one incremental detokeniser behind every streaming surface: whatever the token boundaries,
the pieces it hands out join up to the decoded text, never show half a character, and stop where a
stop string begins."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from edge_app.terminal import StreamView
from edge_app.textstream import TextStream

# a byte-level "tokenizer": token id = one byte, so any token boundary can split a character
TEXT = "Grüße, 世界 ☕ — naïve 🙂!\nok"


def decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", "replace")


def byte_ids(text: str) -> list[int]:
    return list(text.encode())


def chunked(ids: list[int], cuts: list[int]) -> list[list[int]]:
    bounds = sorted({c % (len(ids) + 1) for c in cuts} | {0, len(ids)})
    return [ids[a:b] for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 200), max_size=20))
def test_pieces_join_up_to_the_text_and_never_show_half_a_character(cuts):
    stream = TextStream(decode)
    pieces = [stream.feed(chunk) for chunk in chunked(byte_ids(TEXT), cuts)]
    pieces.append(stream.finish())
    assert "".join(pieces) == TEXT == stream.text
    assert not any("\ufffd" in p for p in pieces)


def test_a_split_character_waits_for_its_last_byte():
    stream = TextStream(decode)
    coffee = byte_ids("☕")  # three bytes
    assert stream.feed(byte_ids("a") + coffee[:1]) == "a"
    assert stream.feed(coffee[1:2]) == ""
    assert stream.feed(coffee[2:]) == "☕"
    assert stream.finish() == ""


def test_an_answer_that_really_ends_mid_character_shows_the_replacement_at_the_end():
    stream = TextStream(decode)
    assert stream.feed(byte_ids("ok") + byte_ids("é")[:1]) == "ok"
    assert stream.finish() == "\ufffd"


def test_context_dependent_tokens_are_decoded_with_their_neighbours():
    """A SentencePiece-like decoder drops the leading space of the first token: decoding token by
    token would glue the words together."""
    vocab = {1: "▁Hello", 2: "▁wor", 3: "ld", 4: "▁again"}

    def spm_decode(ids):
        return "".join(vocab[i] for i in ids).replace("▁", " ").removeprefix(" ")

    stream = TextStream(spm_decode)
    assert [stream.feed([i]) for i in (1, 2, 3, 4)] == ["Hello", " wor", "ld", " again"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 200), max_size=20), st.sampled_from(["世界", "\n", "naïve 🙂", "ok", "zz"]))
def test_stop_strings_cut_the_text_and_are_never_shown(cuts, stop):
    stream = TextStream(decode, (stop, "never"))
    pieces = [stream.feed(chunk) for chunk in chunked(byte_ids(TEXT), cuts)]
    pieces.append(stream.finish())
    expected = TEXT.split(stop)[0]
    assert "".join(pieces) == expected == stream.text
    assert stream.stopped == (stop in TEXT)


def test_a_possible_stop_start_is_held_back_until_it_is_decided():
    stream = TextStream(decode, ("\n\n",))
    assert stream.feed(byte_ids("line\n")) == "line"
    assert stream.feed(byte_ids("more")) == "\nmore"
    assert stream.feed(byte_ids("\n\nrest")) == "" and stream.stopped
    assert stream.feed(byte_ids("after the stop")) == ""
    assert stream.finish() == "" and stream.text == "line\nmore"


def test_preview_shows_the_drafts_after_the_committed_text():
    stream = TextStream(decode)
    coffee = byte_ids("☕")
    assert stream.feed(byte_ids("tea or ") + coffee[:2]) == "tea or "
    assert stream.preview(coffee[2:] + byte_ids("?")) == "☕?"  # completes the pending character
    assert stream.preview(byte_ids("x")) == "\ufffdx"  # a pending character a draft cannot complete
    assert stream.preview(coffee[2:] + [0xE4]) == "☕"  # a draft ending mid-character: cut there
    assert stream.preview([]) == ""


def test_the_terminal_view_streams_through_it():
    out: list[str] = []
    view = StreamView(decode, out.append, ansi=False, terminal=False)
    for chunk in chunked(byte_ids(TEXT), [3, 5, 9, 14, 20, 26, 30]):
        view(chunk, [])
    assert view.finish() == TEXT and "".join(out) == TEXT
