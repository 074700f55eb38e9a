"""`picospec chat`: a terminal chat with the target model, drafted on this device.

Each turn re-sends the whole conversation in the model's chat template over one EdgeClient; the
drafter and the verifier both keep the prefix they already hold, so only the new turn is prefilled.
Committed (verified) text streams as verdicts arrive. On a real terminal the drafted-but-unverified
tail is shown dim after it and overwritten when the next verdict lands.

The event loop runs on a background thread for the whole chat, so the WebSocket keeps answering the
verifier's heartbeats while the user is typing; the main thread does input() (readline) and, while
an answer runs, turns Ctrl-C into a cancel of the generation task.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from edge_app.args import add_edge_arguments, add_sampling_arguments, edge_config_kwargs, generate_options
from edge_app.stats import merge_stats
from edge_app.terminal import DIM, RESET, StreamView, fancy_terminal

EDGE_LABEL = "[edge only — draft model, not target quality]"
PROMPT = "you> "
HELP = """commands:
  /help                      this list
  /stats                     acceptance, tokens/s, bytes, latency of the last turn and the chat
  /mode pipeline|sync|cloud|edge   how answers are made (edge = draft only, not target quality)
  /temp X                    sampling temperature (0 = greedy)
  /system TEXT               set the system prompt (/system alone shows it)
  /reset                     forget the conversation (keeps the system prompt)
  /save FILE                 write the conversation and its stats as JSON
  /quit                      leave (Ctrl-D too); Ctrl-C stops an answer, at the prompt it leaves"""


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat in the terminal: verified text streams as it is committed")
    p.add_argument("--system", default=None, help="a system prompt")
    p.add_argument("--plain", action="store_true", help="no colours or speculative text even on a terminal")
    add_sampling_arguments(p)
    add_edge_arguments(p)
    p.set_defaults(func=run, max_new_tokens=256)


# -- numbers ---------------------------------------------------------------------------------
def _num(x, fmt: str = ".2f", none: str = "-") -> str:
    return none if x is None else format(x, fmt)


def footer(stats: dict) -> str:
    """One line after each answer: mode, tokens, speed, acceptance, TTFT."""
    parts = [stats["mode"], f"{stats['new_tokens']} tokens", f"{_num(stats['tokens_per_s'], '.1f')} tok/s"]
    if stats.get("acceptance_rate") is not None:
        parts.append(f"acceptance {stats['acceptance_rate']:.2f}")
    parts.append(f"TTFT {_num(stats['ttft_s'])} s")
    return "[" + " · ".join(parts) + "]"


def format_stats(last: dict | None, turns: list[dict]) -> str:
    """/stats: the last turn, the whole chat, and the edge meters of the last turn."""
    if last is None:
        return "no answers yet"
    total = merge_stats(turns)
    lines = [
        f"last turn:  {last['mode']}, {last['new_tokens']} tokens in {last['wall_s']:.2f} s = "
        f"{_num(last['tokens_per_s'], '.2f')} tok/s, TTFT {_num(last['ttft_s'])} s, acceptance "
        f"{_num(last['acceptance_rate'])} ({last['accepted']}/{last['accepted'] + last['rejected']} drafts), "
        f"{last['bytes_up']} B up / {last['bytes_down']} B down",
        f"this chat:  {len(turns)} answers, {total['new_tokens']} tokens, {_num(total['tokens_per_s'], '.2f')} tok/s, "
        f"acceptance {_num(total['acceptance_rate'])}, {total['bytes_up']} B up / {total['bytes_down']} B down"
        f" ({_num(total['bytes_up_per_token'], '.0f')} / {_num(total['bytes_down_per_token'], '.0f')} B per token)",
    ]
    edge = last.get("edge") or {}
    if edge:
        phases = ", ".join(f"{k} {v:.2f} s" for k, v in edge.get("phases_s", {}).items() if v > 0)
        tpot = edge.get("tpot_ms") or {}
        tpot_text = (f"TPOT p50 {tpot['p50']:.0f} ms, p95 {tpot['p95']:.0f} ms"
                     if tpot.get("p50") is not None else "TPOT -")
        lines.append(f"edge meters: {phases}; {tpot_text}; CPU {_num(edge.get('cpu_s'))} s; "
                     f"peak RSS {_num(edge.get('peak_rss_mib'), '.0f')} MiB")
    return "\n".join(lines)


def parse_command(line: str) -> tuple[str, str]:
    """'/temp 0.7' -> ('temp', '0.7')."""
    name, _, arg = line[1:].strip().partition(" ")
    return name.lower(), arg.strip()


# -- the event loop on its own thread --------------------------------------------------------
class LoopThread:
    """An asyncio loop on a daemon thread; call() runs a coroutine there and waits for it."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="picospec-chat-loop")
        self.thread.start()

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def call_interruptible(self, coro) -> tuple[object, bool]:
        """(result, interrupted): Ctrl-C meanwhile cancels the task instead of raising here."""
        state: dict = {"task": None, "cancel": False}

        def cancel() -> None:
            state["cancel"] = True
            task = state["task"]
            if task is not None and not task.done():
                task.cancel()
                # Python 3.11's wait_for swallows a cancel that races a reply: insist until it ends
                self.loop.call_later(0.25, cancel)

        async def guarded():
            task = state["task"] = asyncio.ensure_future(coro)
            if state["cancel"]:
                task.cancel()
            try:
                return await task, False
            except asyncio.CancelledError:
                if task.cancelled():
                    return None, True
                raise

        # the handler goes in first: a Ctrl-C at any moment from here on cancels, never raises
        previous = signal.signal(signal.SIGINT, lambda *_: self.loop.call_soon_threadsafe(cancel))
        try:
            return asyncio.run_coroutine_threadsafe(guarded(), self.loop).result()
        finally:
            signal.signal(signal.SIGINT, previous)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


async def start_client(client) -> None:
    """Start the edge; from then on one worker thread runs every drafter call, so a call left
    running by a cancelled answer finishes before the next answer's first call starts."""
    await client.start()
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(1, thread_name_prefix="picospec-drafter"))


async def drop_session(client) -> None:
    """Forget the verifier session after an interrupted or failed answer: the cloud may still be
    working on it (cloud-only generation runs to its end), so the next turn starts a fresh one."""
    if client.link is not None:
        await client.link.close()
        client.link = None


async def shutdown(client) -> None:
    """Cancel whatever still runs (an answer or a start cut short), then close the edge."""
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)
    await drop_session(client)
    await client.close()


# -- the chat --------------------------------------------------------------------------------
class Chat:
    """The conversation, the settings, and one answer per user line."""

    def __init__(self, client, runner: LoopThread, options, system: str | None, interactive: bool,
                 ansi: bool, out=sys.stdout):
        self.client, self.runner, self.options = client, runner, options
        self.system = system
        self.turns: list[dict] = []  # user and assistant messages, in order
        self.stats: list[dict] = []
        self.interactive, self.ansi, self.out = interactive, ansi, out
        self.terminal = out.isatty()
        self.view: StreamView | None = None  # the answer being streamed
        client.on_notice = self.notice

    def say(self, text: str, dim: bool = False) -> None:
        self.out.write((f"{DIM}{text}{RESET}" if dim and self.ansi else text) + "\n")
        self.out.flush()

    def info(self, text: str) -> None:
        """Notes for the person: stdout on a terminal, stderr when stdout is a pipe."""
        if self.interactive:
            self.say(text, dim=True)
        else:
            print(text, file=sys.stderr, flush=True)

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns

    def loop(self) -> None:
        while True:
            try:
                line = input(PROMPT if self.interactive else "")
            except (EOFError, KeyboardInterrupt):
                if self.interactive:
                    self.out.write("\n")
                return
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(*parse_command(line)):
                    return
                continue
            try:
                self.answer(line)
            except KeyboardInterrupt:  # Ctrl-C before the answer's own handler was in place
                self.say("\n[interrupted]", dim=True)
                if self.turns and self.turns[-1]["role"] == "user":
                    self.turns.pop()

    # -- one answer --------------------------------------------------------------------------
    def answer(self, text: str) -> None:
        from edge_app.drafter import ContextFullError
        from edge_app.link import CloudError

        self.turns.append({"role": "user", "content": text})
        ids = self.client.encode_chat(self.messages())
        edge = self.options.mode == "edge"
        if edge or not getattr(self.client, "cloud_available", True):
            self.say(EDGE_LABEL, dim=True)  # the client looks for the cloud again meanwhile
        self.view = view = StreamView(self.client.decode, self._write, self.ansi, self.terminal)
        try:
            answer, interrupted = self.runner.call_interruptible(self.client.generate_ids(ids, self.options, view))
        except (CloudError, ContextFullError) as err:  # a refusal, or a lost cloud with fallback off
            view.finish()
            self.runner.call(drop_session(self.client))
            self.turns.pop()
            hint = "the verifier failed: " if isinstance(err, CloudError) else ""
            self.say(f"\n{hint}{err}" + ("" if hint else "; /reset starts a new conversation"))
            return
        finally:
            self.view = None
        reply = view.finish()
        if interrupted:
            self.runner.call(drop_session(self.client))
            self.say("\n[interrupted]", dim=True)
        else:
            stats = answer.stats.to_dict()
            self.stats.append(stats)
            n = 0 if edge else stats.get("edge_only_tokens", 0)
            label = f"[{n} of {stats['new_tokens']} tokens edge only — draft model, not target quality]" if n else ""
            self.say("")
            if self.interactive:
                self.say(" ".join(filter(None, [footer(stats), label])), dim=True)
            elif label:
                self.say(label)
            if not self.interactive:
                self.say("")
        if reply:
            self.turns.append({"role": "assistant", "content": reply})
        else:
            self.turns.pop()  # nothing was committed: forget the question too

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def notice(self, text: str) -> None:
        """The client's notices (cloud lost, cloud back), from the loop thread: a line of their own."""
        if self.view is not None and self.interactive:
            self.view.interject(f"{DIM}[{text}]{RESET}" if self.ansi else f"[{text}]")
        else:
            self.info(text)

    # -- commands ----------------------------------------------------------------------------
    def command(self, name: str, arg: str) -> bool:
        """Runs one /command; False to leave the chat."""
        from edge_app.pipeline import MODES

        if name in ("quit", "exit", "q"):
            return False
        if name == "help":
            self.say(HELP)
        elif name == "stats":
            self.say(format_stats(self.stats[-1] if self.stats else None, self.stats))
        elif name == "mode":
            if arg not in MODES:
                self.say(f"mode is {self.options.mode}; choose one of {', '.join(MODES)}")
            else:
                self.options = replace(self.options, mode=arg)
                self.say(f"mode: {arg}" + (f"  {EDGE_LABEL}" if arg == "edge" else ""))
        elif name == "temp":
            try:
                params = replace(self.options.params, temperature=float(arg)).validate()
            except ValueError as err:
                self.say(f"/temp needs a number >= 0 ({err})")
            else:
                self.options = replace(self.options, params=params)
                self.say(f"temperature: {params.temperature:g}" + (" (greedy)" if params.greedy else ""))
        elif name == "system":
            if arg:
                self.system = arg
                self.say("system prompt set")
            else:
                self.say(f"system prompt: {self.system!r}; /system TEXT sets it")
        elif name == "reset":
            self.turns = []
            self.say("conversation forgotten")
        elif name == "save":
            self.say(self.save(arg) if arg else "/save needs a file name")
        else:
            self.say(f"unknown command /{name}; /help lists them")
        return True

    def save(self, path: str) -> str:
        data = {"messages": self.messages(), "mode": self.options.mode,
                "temperature": self.options.params.temperature, "draft": self.client.draft_name,
                "cloud": self.client.cloud_url, "turn_stats": self.stats}
        try:
            Path(path).expanduser().write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        except OSError as err:
            return f"cannot save: {err}"
        return f"saved {len(self.turns)} messages to {path}"


def _setup_readline() -> None:
    """Line editing and a history file, where the readline module exists."""
    try:
        import atexit
        import readline
    except ImportError:
        return
    from models.store import cache_dir

    history = cache_dir() / "chat_history"
    try:
        readline.read_history_file(history)
    except OSError:
        pass
    readline.set_history_length(1000)

    def save() -> None:
        try:
            history.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(history)
        except OSError:
            pass

    atexit.register(save)


def run(args) -> int:
    from edge_app.client import EdgeClient, EdgeConfig
    from edge_app.embedded import EmbeddedVerifierError
    from models.errors import ModelError

    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    ansi = interactive and not args.plain and fancy_terminal(sys.stdin, sys.stdout, os.environ)
    try:
        options = generate_options(args)
    except ValueError as err:
        print(f"picospec chat: {err}", file=sys.stderr)
        return 2
    client = EdgeClient(EdgeConfig(**edge_config_kwargs(args)))
    runner = LoopThread()
    chat = Chat(client, runner, options, args.system, interactive, ansi)
    where = args.cloud or "a local verifier (starting it)"
    chat.info(f"loading the draft; target verifies at {where} ...")
    try:
        runner.call(start_client(client))
    except ModelError as err:
        print(f"picospec chat: {err}", file=sys.stderr)
        runner.call(client.close())
        return 2
    except EmbeddedVerifierError as err:
        print(f"picospec chat: {err}", file=sys.stderr)
        chat.options = replace(chat.options, mode="edge")
        chat.info(f"continuing with edge-only answers {EDGE_LABEL}")
    except KeyboardInterrupt:
        runner.call(shutdown(client))
        return 130
    # a closed terminal or a kill: leave through the finally below, which stops the local verifier
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
    if interactive:
        _setup_readline()
    chat.info(f"PicoSpec chat: draft {client.draft_name} on this device, verified at {client.cloud_url} "
              f"(mode {chat.options.mode}). /help lists commands, Ctrl-C stops an answer, Ctrl-D leaves.")
    try:
        chat.loop()
    finally:
        runner.call(shutdown(client))
        runner.close()
    return 0
