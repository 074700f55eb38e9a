"""`picospec demo` (what `make demo` runs): the whole system on one machine in a couple of minutes.

A local verifier process plays the cloud. A short conversation (a coding question and a follow-up
that refers to it) goes through the pipeline, streamed as it is committed; then the same prompts
go to the target alone (cloud-only), and a table compares the two. Greedy decoding, so the two
transcripts must be identical: that is PicoSpec's promise, checked in front of the user.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import replace

from edge_app.repl import drop_session, start_client
from edge_app.args import add_edge_arguments, edge_config_kwargs
from edge_app.stats import merge_stats
from edge_app.terminal import DIM, RESET, StreamView, fancy_terminal

# short answers, so that both fit in the default 64 tokens; the second needs the first
CONVERSATION = (
    "Write a one-line Python function is_even(n).",
    "Now use it to keep the even numbers of [3, 8, 5, 12].",
)


def register(sub) -> None:
    p = sub.add_parser("demo", help="a short chat through the pipeline vs the target alone, on this machine")
    p.add_argument("--max-new-tokens", type=int, default=64, help="per answer (default 64)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the transcripts and stats as JSON")
    add_edge_arguments(p)
    # float32 unless asked: PyTorch's bfloat16 matmuls are tens of times slower on CPUs without
    # native bf16 (AVX2-only laptops and CI boxes), and the demo has to finish in minutes there
    p.set_defaults(func=run, dtype="float32")


async def converse(client, prompts, options, make_view=None, on_turn=None) -> list[dict]:
    """Run a conversation, each turn re-sending the history; per turn its text, ids and stats."""
    messages, turns = [], []
    for prompt in prompts:
        messages.append({"role": "user", "content": prompt})
        view = make_view(prompt) if make_view else None
        answer = await client.generate_ids(client.encode_chat(messages), options, view)
        text = view.finish() if view else client.decode(answer.token_ids)
        messages.append({"role": "assistant", "content": text})
        turns.append({"prompt": prompt, "text": text, "token_ids": answer.token_ids, "stats": answer.stats.to_dict()})
        if on_turn:
            on_turn(len(turns), turns[-1]["stats"])
    return turns


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where two outputs differ (None if identical)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def comparison_rows(pipe: dict, cloud: dict) -> list[tuple[str, str, str]]:
    """(metric, pipeline, cloud-only) from two merged stats dicts."""
    def f(x, fmt=".2f"):
        return "-" if x is None else format(x, fmt)

    speedup = (pipe["tokens_per_s"] / cloud["tokens_per_s"]) if pipe["tokens_per_s"] and cloud["tokens_per_s"] else None
    return [
        ("tokens", str(pipe["new_tokens"]), str(cloud["new_tokens"])),
        ("wall time (s)", f(pipe["wall_s"]), f(cloud["wall_s"])),
        ("tokens/s", f(pipe["tokens_per_s"]), f(cloud["tokens_per_s"])),
        ("TTFT, mean (s)", f(pipe["ttft_s"]), f(cloud["ttft_s"])),
        ("acceptance", f(pipe["acceptance_rate"]), "-"),
        ("accepted per round", f(pipe["mean_accepted_per_round"]), "-"),
        ("bytes up / token", f(pipe["bytes_up_per_token"], ".0f"), f(cloud["bytes_up_per_token"], ".0f")),
        ("bytes down / token", f(pipe["bytes_down_per_token"], ".0f"), f(cloud["bytes_down_per_token"], ".0f")),
        ("speedup", f"{f(speedup)}x", "1.00x"),
    ]


def format_table(rows: list[tuple[str, str, str]], heads=("", "picospec (auto)", "cloud only")) -> str:
    rows = [heads, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    line = lambda r: f"  {r[0]:<{widths[0]}}   {r[1]:>{widths[1]}}   {r[2]:>{widths[2]}}"  # noqa: E731
    return "\n".join([line(rows[0]), "  " + "-" * (sum(widths) + 6), *map(line, rows[1:])])


async def demo(args) -> int:
    from edge_app.client import EdgeClient, EdgeConfig
    from edge_app.pipeline import GenerateOptions

    ansi = fancy_terminal(sys.stdin, sys.stdout, os.environ)
    say = lambda text="", dim=False: print(f"{DIM}{text}{RESET}" if dim and ansi else text, flush=True)  # noqa: E731
    client = EdgeClient(EdgeConfig(**edge_config_kwargs(args)))
    say("PicoSpec demo: starting the draft on this device and a local verifier process (the cloud) ...", dim=True)
    try:
        await start_client(client)
        say(f"draft {client.draft_name} (edge, llama.cpp) | verifier at {client.cloud_url} (target, PyTorch)", dim=True)
        options = GenerateOptions(max_new_tokens=args.max_new_tokens)
        # a first tiny answer warms both sides up, so neither mode below pays for it
        await client.generate_ids(client.encode_chat([{"role": "user", "content": "Hi"}]), replace(options, max_new_tokens=4))
        await drop_session(client)

        def make_view(prompt: str) -> StreamView:
            say(f"\nyou> {prompt}")
            return StreamView(client.decode, lambda s: (sys.stdout.write(s), sys.stdout.flush()), ansi, sys.stdout.isatty())

        def report(i: int, s: dict) -> None:
            acceptance = "" if s["acceptance_rate"] is None else f", acceptance {s['acceptance_rate']:.2f}"
            say(f"{'' if s['mode'] == 'cloud' else chr(10)}   [{s['mode']} turn {i}: {s['new_tokens']} tokens, "
                f"{s['tokens_per_s']:.2f} tok/s{acceptance}, TTFT {s['ttft_s'] or 0:.2f} s]", dim=True)

        say("\n== 1. PicoSpec (auto mode): the edge drafts, the cloud verifies (verified text streams as it is committed)")
        pipe = await converse(client, CONVERSATION, options, make_view, report)
        await drop_session(client)  # a fresh verifier session: cloud-only starts from an empty cache too

        say("\n== 2. the same conversation, target only (cloud-only decoding)")
        cloud = await converse(client, CONVERSATION, replace(options, mode="cloud"), on_turn=report)
    finally:
        await drop_session(client)
        await client.close()

    pipe_stats, cloud_stats = merge_stats([t["stats"] for t in pipe]), merge_stats([t["stats"] for t in cloud])
    say("\n== 3. comparison (greedy, this machine)")
    say(format_table(comparison_rows(pipe_stats, cloud_stats)))
    diffs = [first_difference(p["token_ids"], c["token_ids"]) for p, c in zip(pipe, cloud)]
    if all(d is None for d in diffs):
        say(f"\nidentical greedy output: yes ({len(pipe)}/{len(pipe)} answers, token for token)")
    else:
        where = ", ".join(f"turn {i} at token {d}" for i, d in enumerate(diffs, 1) if d is not None)
        say(f"\nidentical greedy output: NO ({where}) -- please report this")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"pipeline": pipe, "cloud": cloud, "pipeline_stats": pipe_stats, "cloud_stats": cloud_stats,
                       "identical": all(d is None for d in diffs)}, fh, indent=2)
    return 0


def run(args) -> int:
    from edge_app.embedded import EmbeddedVerifierError
    from edge_app.link import CloudError
    from models.errors import ModelError

    try:
        return asyncio.run(demo(args))
    except (ModelError, CloudError, EmbeddedVerifierError) as err:
        print(f"picospec demo: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
