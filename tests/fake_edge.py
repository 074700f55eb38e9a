"""A stand-in for EdgeClient with no models: one token per character, a fixed answer per prompt.

It commits a few characters at a time with a speculative tail, as the real pipeline does, so the
REPL's display and the OpenAI endpoint's streaming can be tested in milliseconds.
"""
from __future__ import annotations

import asyncio

from edge_app.link import CloudError
from edge_app.pipeline import Answer, GenerationStats

EOS = 0


class FakeDrafter:
    n_ctx = 4096
    n_vocab = 0x110000


class FakeClient:
    """encode_chat/decode/generate_ids like EdgeClient; `reply(prompt_text)` decides the answer."""

    def __init__(self, reply=lambda prompt: "Hello world, this is a test. 1, 2, 3.", step: int = 3,
                 delay_s: float = 0.0, refuse: str | None = None, cloud_down: bool = False):
        """refuse: every cloud-backed answer raises CloudError(refuse) (a refusal, or a lost cloud
        with edge fallback off); cloud_down: answers fall back to the draft, as EdgeClient does."""
        self.reply, self.step, self.delay_s, self.refuse, self.cloud_down = reply, step, delay_s, refuse, cloud_down
        self.cloud_available = True
        self.on_notice = lambda text: None
        self.drafter = FakeDrafter()
        self.stop_ids = (EOS,)
        self.draft_name = "fake-draft"
        self.cloud_url = "ws://fake/ws"
        self.link = None
        self.calls: list[tuple[str, str]] = []  # (mode, prompt text)
        self.running = 0
        self.max_running = 0

    def encode_chat(self, messages: list[dict]) -> list[int]:
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"
        return [ord(c) for c in text]

    def encode_prompt(self, prompt: str, raw: bool = False, system: str | None = None) -> list[int]:
        return [ord(c) for c in prompt]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(t) for t in ids if t != EOS)

    async def generate_ids(self, prompt_ids, options, on_commit=None) -> Answer:
        prompt = self.decode(prompt_ids)
        self.calls.append((options.mode, prompt))
        if self.refuse and options.mode != "edge":
            raise CloudError(self.refuse, "fake cloud refuses")
        edge_only = self.cloud_down and options.mode != "edge"
        if edge_only and self.cloud_available:
            self.cloud_available = False
            self.on_notice("the verifier is unreachable: continuing with the draft model alone")
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            ids = [ord(c) for c in self.reply(prompt)] + [EOS]
            ids = ids[: options.max_new_tokens]
            stats = GenerationStats(mode=options.mode)
            for i in range(0, len(ids), self.step):
                await asyncio.sleep(self.delay_s)
                new, spec = ids[i:i + self.step], ids[i + self.step:i + 2 * self.step]
                stats.accepted += len(new)
                stats.drafted += len(new) + 1
                stats.rejected += 1
                stats.rounds += 1
                if stats.ttft_s is None:
                    stats.ttft_s = 0.01
                if on_commit:
                    on_commit(new, spec)
            stats.new_tokens = len(ids)
            stats.edge_only_tokens = len(ids) if edge_only else 0
            stats.wall_s = 0.1
            stats.bytes_up, stats.bytes_down = 10 * len(ids), 5 * len(ids)
            return Answer(ids, stats, "stop" if ids and ids[-1] == EOS else "length")
        finally:
            self.running -= 1
