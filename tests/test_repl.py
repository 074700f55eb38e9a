"""`picospec chat`: the display and the chat logic over a fake client (fast), then the real command
in a real pseudo-terminal with the default models (slow, started once)."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from edge_app.pipeline import GenerateOptions
from edge_app.repl import EDGE_LABEL, Chat, LoopThread, format_stats, parse_command
from edge_app.terminal import DIM, ERASE_EOL, StreamView, advance_column, fit_columns, sanitize
from tests.fake_edge import FakeClient

ROOT = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


# -- the display -----------------------------------------------------------------------------
def decode(ids):
    return "".join(map(chr, ids))


def ids(text):
    return [ord(c) for c in text]


def test_plain_view_writes_committed_text_only():
    out = []
    view = StreamView(decode, out.append, ansi=False, terminal=False)
    view(ids("Hel"), ids("lo"))
    view(ids("lo\x1b"), [])
    assert view.finish() == "Hello\x1b" and "".join(out) == "Hello\x1b"  # a pipe gets the raw text


def test_ansi_view_shows_speculative_tail_then_overwrites_it():
    out = []
    view = StreamView(decode, out.append, ansi=True, terminal=True, columns=lambda: 20)
    view(ids("ab"), ids("cd\nef"))
    assert out[-1] == f"ab{DIM}cd\x1b[0m\x1b[2D"  # first line of the draft only, cursor back over it
    view(ids("cX"), [])
    assert out[-1] == f"{ERASE_EOL}cX"
    view(ids("1234567890123456"), ids("spec"))  # the line is full: no room for speculative text
    assert DIM not in out[-1]
    assert ANSI.sub("", "".join(out)) == "ab" + "cd" + "cX" + "1234567890123456"
    assert view.finish() == "abcX1234567890123456"


def test_terminal_helpers():
    assert advance_column(0, "abc", 10) == 3
    assert advance_column(8, "abc", 10) == 1  # wrapped
    assert advance_column(3, "x\nyz", 10) == 2
    assert advance_column(0, "日本", 10) == 4
    assert fit_columns("日本語\nmore", 5) == "日本"
    assert sanitize("a\x1b[2Jb\tc\n\x07") == "a[2Jb\tc\n"
    assert parse_command("/temp  0.7 ") == ("temp", "0.7")
    assert parse_command("/QUIT") == ("quit", "")


# -- the chat over a fake client -------------------------------------------------------------
@pytest.fixture()
def loop():
    runner = LoopThread()
    yield runner
    runner.close()


def make_chat(loop, client, mode="pipeline"):
    out = io.StringIO()
    chat = Chat(client, loop, GenerateOptions(max_new_tokens=64, mode=mode), None, interactive=False,
                ansi=False, out=out)
    return chat, out


def test_turns_resend_the_conversation(loop):
    client = FakeClient(reply=lambda prompt: f"answer {prompt.count('<user>')}")
    chat, out = make_chat(loop, client)
    chat.answer("first")
    chat.answer("second")
    assert out.getvalue() == "answer 1\n\nanswer 2\n\n"
    assert [m["content"] for m in chat.messages()] == ["first", "answer 1", "second", "answer 2"]
    assert client.calls[1][1].startswith(client.calls[0][1] + "answer 1")  # the shared prefix
    chat.command("system", "be brief")
    chat.command("temp", "0.5")
    assert chat.options.params.temperature == 0.5 and chat.messages()[0] == {"role": "system", "content": "be brief"}
    assert "acceptance" in format_stats(chat.stats[-1], chat.stats) and "tok/s" in format_stats(chat.stats[-1], chat.stats)


def test_cloud_down_answers_are_labelled_edge_only(loop, capsys):
    client = FakeClient(cloud_down=True)
    chat, out = make_chat(loop, client)
    chat.answer("one")
    chat.answer("two")
    assert out.getvalue().count("edge only — draft model, not target quality") == 3  # after 1, before+after 2
    assert capsys.readouterr().err.count("unreachable") == 1  # said once
    assert [c[0] for c in client.calls] == ["pipeline", "pipeline"]


def test_a_refusal_is_reported_and_the_question_dropped(loop):
    chat, out = make_chat(loop, FakeClient(refuse="unauthorized"))
    chat.answer("one")
    assert "the verifier failed: unauthorized" in out.getvalue() and chat.turns == []
    assert chat.command("mode", "edge") and chat.options.mode == "edge"
    chat.answer("two")
    assert EDGE_LABEL in out.getvalue() and len(chat.turns) == 2


def test_ctrl_c_stops_the_answer_and_keeps_the_chat(loop):
    client = FakeClient(reply=lambda prompt: "x" * 60, step=1, delay_s=0.02)
    chat, out = make_chat(loop, client)
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
    chat.answer("long")
    partial = chat.turns[-1]["content"]
    assert "[interrupted]" in out.getvalue() and 0 < len(partial) < 60
    client.reply, client.delay_s = (lambda prompt: "ok"), 0.0
    chat.answer("next")
    assert chat.turns[-1]["content"] == "ok" and len(chat.turns) == 4


def test_save_writes_the_conversation(loop, tmp_path):
    chat, _ = make_chat(loop, FakeClient())
    chat.answer("hi")
    chat.command("save", str(tmp_path / "c.json"))
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["messages"][1]["role"] == "assistant" and data["turn_stats"][0]["new_tokens"] > 0


# -- the chat over a real (tiny) edge and verifier --------------------------------------------
class CountingDrafter:
    """Wraps a tiny drafter; records every feed as (first position, tokens) to count prefill work."""

    def __init__(self, inner):
        self.inner, self.fed = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def feed(self, ids):
        self.fed.append((self.inner.length, len(ids)))
        self.inner.feed(ids)

    def prefill(self, ids):  # the tiny drafter's own prefill would call its own feed, unseen
        
        keep = common_prefix_len(self.inner.tokens[:len(ids) - 1], ids)
        self.inner.rollback(keep)
        self.feed(ids[keep:])

    def prompt_positions_computed(self, since: int, prompt_len: int) -> int:
        """Positions below prompt_len the drafter computed in feeds since the given call."""
        return sum(max(0, min(start + n, prompt_len) - start) for start, n in self.fed[since:])


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tiny_chat_ids(messages: list[dict]) -> list[int]:
    """A chat template for the tiny vocabulary: role id, content, end id per message, then the
    assistant's role id. Assistant text ("t5 t9 ", as the tiny drafter decodes) maps back to its ids."""
    role = {"system": 3, "user": 1, "assistant": 2}
    ids = []
    for m in messages:
        if m["role"] == "assistant":
            body = [int(word[1:]) for word in m["content"].split()]
        else:
            body = [10 + ord(c) % 50 for c in m["content"]]
        ids += [role[m["role"]], *body, 4]
    return ids + [role["assistant"]]


def prefill_tokens_metric(port: int) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("picospec_prefill_tokens_total "):
                return float(line.split()[1])
    raise AssertionError("no picospec_prefill_tokens_total in /metrics")


def test_kv_cache_reused_across_turns(loop):
    """The second turn re-sends the whole conversation; the drafter and the verifier each compute
    only what their cache does not hold: the end of the first answer and the new user turn."""
    from cloud.engine import TargetEngine
    from tests.tiny import ServerThread, TinyDrafter, perturbed, tiny_model
    from tests.tiny_edge import reference, tiny_client

    target = tiny_model(0)
    n = 10
    with ServerThread(TargetEngine(target)) as server:
        drafter = CountingDrafter(TinyDrafter(perturbed(target, 0.5)))
        client = tiny_client(server.url, drafter)
        client.encode_chat = tiny_chat_ids
        chat, _ = make_chat(loop, client)
        chat.options = GenerateOptions(max_new_tokens=n, mode="pipeline")
        try:
            prompt1 = tiny_chat_ids(chat.messages() + [{"role": "user", "content": "first question"}])
            chat.answer("first question")
            edge1, cloud1 = drafter.prompt_positions_computed(0, len(prompt1)), prefill_tokens_metric(server.port)
            answer1 = tiny_chat_ids(chat.messages())[len(prompt1):-2]  # the answer's ids
            fed_before, cached_before = len(drafter.fed), drafter.tokens
            prompt2 = tiny_chat_ids(chat.messages() + [{"role": "user", "content": "and a second one"}])
            chat.answer("and a second one")
            edge2 = drafter.prompt_positions_computed(fed_before, len(prompt2))
            cloud2 = prefill_tokens_metric(server.port) - cloud1
        finally:
            loop.call(drop_link(client))
    assert answer1 == reference(target, prompt1, n)
    assert [int(w[1:]) for w in chat.turns[-1]["content"].split()] == reference(target, prompt2, n)
    # the first turn computes its whole prompt on both sides (the counts see real work)
    assert edge1 == len(prompt1) and cloud1 == len(prompt1)
    # the second: the cloud held the whole first turn (at most its last answer token unfed); the
    # drafter held at least the first prompt (tokens committed by the cloud at the very end of an
    # answer are fed lazily, with the next prompt), and each side computed only what it lacked
    held = len(prompt1) + len(answer1) - 1
    new = len(prompt2) - held  # the answer's last token, its end id and the new user turn
    edge_held = common_prefix_len(cached_before, prompt2)
    assert len(prompt1) <= edge_held
    assert 0 < edge2 <= len(prompt2) - edge_held < len(prompt2) - len(prompt1) + 1
    assert 0 < cloud2 <= new


async def drop_link(client):
    if client.link is not None:
        await client.link.close()
        client.link = None


# -- the real command ------------------------------------------------------------------------
CHAT = [sys.executable, "-m", "picospec.cli", "chat", "--dtype", "float32"]  # float32: fast on any CPU


def answers(path: Path) -> list[str]:
    return [m["content"] for m in json.loads(path.read_text())["messages"] if m["role"] == "assistant"]


@pytest.mark.slow
def test_real_chat_in_a_terminal(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "TERM": "xterm-256color", "PICOSPEC_CACHE": os.environ.get("PICOSPEC_CACHE", "")}
    env = {k: v for k, v in env.items() if v}
    child = pexpect.spawn(CHAT[0], CHAT[1:] + ["--max-new-tokens", "48"], cwd=str(ROOT), env=env,
                          encoding="utf-8", dimensions=(40, 120), timeout=600)
    log = io.StringIO()
    child.logfile_read = log
    try:
        child.expect_exact("you> ")
        # two turns; the second only makes sense with the first in the context
        child.sendline("My name is Zorblax. Reply with just: OK")
        child.expect_exact("you> ", timeout=300)
        child.sendline("What is my name? Reply with just the name.")
        child.expect(r"tok/s", timeout=300)
        child.expect_exact("you> ")
        # Ctrl-C in the middle of a long answer: the answer stops, the chat goes on
        child.sendline("Write a long, detailed essay about the history of computing.")
        child.expect_exact("computing.\r\n")  # the echo of the line
        child.expect(r"[A-Za-z]{3}", timeout=300)  # then the answer has begun
        child.sendintr()
        child.expect_exact("[interrupted]", timeout=120)
        child.expect_exact("you> ")
        child.sendline("What is 2 + 3? Reply with just the number.")
        child.expect(r"tok/s", timeout=300)
        child.expect_exact("you> ")
        child.sendline("/stats")
        child.expect(r"acceptance (\d\.\d\d)")
        child.expect_exact("you> ")
        saved = tmp_path / "chat.json"
        child.sendline(f"/save {saved}")
        child.expect_exact("you> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF, timeout=120)
    finally:
        (tmp_path / "terminal.log").write_text(log.getvalue())
        child.close(force=True)
    said = answers(saved)
    assert len(said) == 4, said
    assert "zorblax" in said[1].lower(), said
    assert "5" in said[3], said
    assert DIM in log.getvalue()  # the speculative tail was shown on the terminal


@pytest.mark.slow
def test_real_chat_piped():
    out = subprocess.run(CHAT + ["--max-new-tokens", "24"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                         input="What is 2 + 3? Reply with just the number.\nAnd 10 + 10?\n")
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout and "you>" not in out.stdout
    parts = [p for p in out.stdout.split("\n\n") if p.strip()]
    assert len(parts) == 2 and "5" in parts[0] and "20" in parts[1], out.stdout
