"""The edge client: a drafter, a link to the verifier, and generation over them.

`EdgeClient` is async (the REPL's and the OpenAI endpoint's event loop drives it); `picospec.api`
wraps it for plain synchronous code.
"""
from __future__ import annotations

import asyncio
import os
import random
import sys
from dataclasses import dataclass, replace

import codec
from edge_app.drafter import Drafter, DrafterConfig
from edge_app.link import CloudError, CloudLink
from edge_app.meters import EdgeMeters
from edge_app.pipeline import RETRYABLE, Answer, CommitCallback, GenerateOptions, Pipeline
from edge_app.policy import Estimates
from edge_app.template import chat_ids, opening_len

MAX_OPENINGS = 8  # chat openings (distinct system turns) the client remembers


@dataclass(frozen=True)
class EdgeConfig:
    draft: str | None = None  # GGUF path; None = $PICOSPEC_DRAFT or the default pair's draft
    cloud: str | None = None  # ws://host:port[/ws], or several comma-separated; None (and no
    # `clouds`) = start a local verifier
    clouds: tuple[str, ...] = ()  # more verifier URLs, tried after `cloud`'s, in turn
    target: str | None = None  # for the local verifier only
    token: str | None = None
    dtype: str = "auto"  # local verifier's target dtype
    threads: int | None = None  # draft threads
    cloud_threads: int | None = None  # local verifier's torch threads
    pin_cores: bool = True  # split this machine's cores between edge and local verifier
    n_ctx: int = 4096
    reply_timeout_s: float = 180.0  # a verifier silent this long is treated as lost (a long
    # prompt's prefill on a slow CPU verifier can take a minute)
    reconnect_s: float = 8.0  # how long to keep retrying a lost verifier before going edge-only
    edge_fallback: bool = True  # continue with the draft alone (labelled) while the cloud is away
    retry_interval_s: float = 5.0  # while edge-only, how often to look for the verifier again
    connect_timeout_s: float = 10.0  # one connection attempt, TCP to welcome
    ca_cert: str | None = None  # PEM file to trust for a wss:// verifier (a self-signed cert)
    backoff_base_s: float = 0.25  # reconnect k waits uniform(0, min(cap, base * 2**k)): full jitter,
    backoff_cap_s: float = 2.0  # so edges that lost the same replica do not all retry at once

    @property
    def cloud_urls(self) -> tuple[str, ...]:
        """Every configured verifier URL, in the order they are tried (empty: a local verifier)."""
        return parse_cloud_urls(self.cloud, self.clouds)


# a lost or refused connection that another replica may not share: go on to the next URL
FAILOVER = (*RETRYABLE, "overloaded")


def parse_cloud_urls(cloud: str | None, clouds=()) -> tuple[str, ...]:
    """`cloud` (comma-separated URLs allowed) then `clouds`, blanks and repeats dropped."""
    urls: list[str] = []
    for part in [*(cloud.split(",") if cloud else ()), *clouds]:
        part = part.strip()
        if part and part not in urls:
            urls.append(part)
    return tuple(urls)


def backoff_delay(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Full jitter: uniform over [0, min(cap, base * 2**attempt)]. Sessions that lost the same
    replica at the same moment come back spread over the window instead of in one millisecond,
    and the window stops growing at the cap."""
    return rng.uniform(0.0, min(cap_s, base_s * (2.0 ** min(attempt, 60))))


class EdgeClient:
    """One edge device: its drafter, and (lazily) one session with the verifier."""

    def __init__(self, config: EdgeConfig = EdgeConfig()):
        self.config = config
        self.drafter: Drafter | None = None
        self.fingerprint: dict | None = None
        self.verifier = None
        self.link: CloudLink | None = None
        self._link_key = None
        self.estimates = Estimates()  # measured numbers, carried across answers
        self.meters = EdgeMeters()
        self.pipeline: Pipeline | None = None
        self.chat_template: str | None = None
        self.stop_ids: tuple[int, ...] = ()
        self.draft_name = ""
        self.cloud_available = True
        self._last_notice: str | None = None
        # notices for the user ("cloud unreachable", "cloud back"); the REPL replaces this
        self.on_notice = lambda text: print(f"picospec: {text}", file=sys.stderr, flush=True)
        self.rng = random.Random()  # reconnect jitter (tests give a seeded one)
        self._url_index = 0  # which of cloud_urls the current (or last) session went to
        # openings of the chat prompts encoded so far (template header + system turn): a prompt
        # that starts with one tells the verifier so (Prompt.shared), which keeps its keys and values
        self._openings: dict[tuple[int, ...], None] = {}

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self, need_cloud: bool = True) -> "EdgeClient":
        from models.fingerprint import from_gguf
        from models.resolve import ensure_ready, resolve_draft

        cores = None
        if not self.config.cloud_urls and need_cloud and self.config.pin_cores:
            from edge_app.embedded import split_cores

            split = split_cores()
            if split:
                edge_cores, cores = split
                os.sched_setaffinity(0, edge_cores)
        loop = asyncio.get_running_loop()
        if not self.config.cloud_urls and need_cloud:
            from edge_app.embedded import EmbeddedVerifier

            threads = self.config.cloud_threads or (len(cores) if cores else None)
            self.verifier = EmbeddedVerifier(self.config.target, self.config.dtype, threads, cores,
                                             self.config.token)
            starting = loop.run_in_executor(None, self.verifier.start)
        else:
            starting = None
        spec = resolve_draft(self.config.draft)
        path = await loop.run_in_executor(None, ensure_ready, spec)
        threads = self.config.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None)
        self.drafter = await loop.run_in_executor(
            None, Drafter, DrafterConfig(str(path), n_ctx=self.config.n_ctx, threads=threads))
        self.draft_name = spec.name
        self.fingerprint = from_gguf(path).to_dict()
        meta = self.drafter.metadata()
        self.chat_template = meta.get("tokenizer.chat_template")
        self.stop_ids = _stop_ids(self.drafter, meta)
        if starting is not None:
            await starting
        return self

    @property
    def cloud_urls(self) -> tuple[str, ...]:
        """The verifier URLs tried in turn: the configured ones, else the local verifier's."""
        return self.config.cloud_urls or ((self.verifier.url,) if self.verifier else ())

    @property
    def cloud_url(self) -> str | None:
        """The verifier this edge talks to now (or last did)."""
        urls = self.cloud_urls
        return urls[self._url_index % len(urls)] if urls else None

    async def close(self) -> None:
        if self.link is not None:
            await self.link.close()
            self.link = None
        if self.verifier is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.verifier.stop)
            self.verifier = None
        if self.drafter is not None:
            self.drafter.close()
            self.drafter = None

    async def _session(self, options: GenerateOptions, fresh: bool = False,
                       connect_timeout_s: float | None = None) -> CloudLink:
        """A verifier session whose sampling settings match `options` (reconnects if they differ)."""
        key = (options.params, options.variant, options.paper_top_k)
        if (not fresh and self.link is not None and self.link.connected and self._link_key == key
                and options.params.seed is None):
            return self.link
        if self.link is not None:
            await self.link.close()
            self.link = None
        # every URL in turn, from the current one: a dead or full replica falls through to the next
        urls = self.cloud_urls
        errors: list[CloudError] = []
        for i in range(len(urls)):
            index = (self._url_index + i) % len(urls)
            try:
                link = await self._open(urls[index], options, connect_timeout_s)
            except CloudError as err:
                if err.code not in FAILOVER:
                    raise  # a refusal (token, model) that every replica would give
                errors.append(err)
                continue
            self._url_index = index
            self.link, self._link_key = link, key
            return link
        if not errors:
            raise CloudError("unreachable", "no verifier URL configured")
        # one that is worth retrying, if any was (a lost replica next to a full one)
        raise next((e for e in errors if e.code in RETRYABLE), errors[-1])

    async def open_session(self, options: GenerateOptions) -> CloudLink:
        """A new verifier session with `options`' sampling settings (the current one is closed):
        for messages of one's own, such as the T(k) probe's greedy drafts."""
        return await self._session(options, fresh=True)

    async def _open(self, url: str, options: GenerateOptions, connect_timeout_s: float | None) -> CloudLink:
        """One connection attempt to one verifier URL: TCP, WebSocket, hello, welcome."""
        p = options.params
        link = CloudLink(url, reply_timeout_s=self.config.reply_timeout_s,
                         connect_timeout_s=connect_timeout_s or self.config.connect_timeout_s,
                         ca_cert=self.config.ca_cert)
        await link.connect(codec.Hello(
            fingerprint=self.fingerprint,
            sampling={"temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k, "seed": p.seed},
            variant=options.variant, paper_top_k=options.paper_top_k, token=self.config.token,
            client="picospec-edge"))
        return link

    # -- text --------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str, raw: bool = False, system: str | None = None) -> list[int]:
        """A prompt as ids: raw text, or one user turn (after an optional system turn) in the chat template."""
        if raw:
            return self.drafter.tokenize(prompt)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return self.encode_chat(messages)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        ids = chat_ids(messages, self.chat_template, self.drafter.tokenize)
        n = opening_len(messages, ids, self.chat_template, self.drafter.tokenize)
        if n:
            key = tuple(ids[:n])
            self._openings.pop(key, None)
            self._openings[key] = None  # the most recent last; a few system turns are kept
            while len(self._openings) > MAX_OPENINGS:
                del self._openings[next(iter(self._openings))]
        return ids

    def opening_of(self, prompt_ids: list[int]) -> int:
        """How many leading ids of a prompt are a chat opening encode_chat has seen (0: none)."""
        return max((len(o) for o in self._openings if tuple(prompt_ids[:len(o)]) == o), default=0)

    def decode(self, ids: list[int]) -> str:
        return self.drafter.detokenize([t for t in ids if t not in self.stop_ids]).decode("utf-8", "replace")

    # -- generation --------------------------------------------------------------------------
    async def generate_ids(self, prompt_ids: list[int], options: GenerateOptions,
                           on_commit: CommitCallback | None = None) -> Answer:
        """One answer in the chosen mode. Raises CloudError when the verifier refuses or vanishes."""
        options = replace(options, stop_ids=options.stop_ids or self.stop_ids)
        link = None
        # a verifier known to be away is not waited for: the answer starts edge-only and the
        # pipeline looks for the verifier in the background
        if options.mode != "edge" and (self.cloud_available or not self.config.edge_fallback):
            try:
                link = await self._session(options)
            except CloudError as err:
                if not (self.config.edge_fallback and err.code in RETRYABLE):
                    raise
        pipeline = Pipeline(self.drafter, link, options, on_commit, self.meters, self.estimates)
        pipeline.reconnect = lambda err: self._reconnect(options, err)
        pipeline.retry_interval_s = self.config.retry_interval_s
        pipeline.notice = self._notice
        self.pipeline = pipeline
        return await pipeline.run(prompt_ids, shared=self.opening_of(prompt_ids))

    async def _reconnect(self, options: GenerateOptions, err: CloudError | None) -> CloudLink | None:
        """A new session after a lost one, retried for up to reconnect_s with jittered exponential
        backoff (full jitter, capped: see backoff_delay), each attempt trying every verifier URL in
        turn, starting after the one just lost; None if the verifiers stay away and edge-only
        fallback is allowed (else the error is raised). err None: the edge-only loop's probe, one
        attempt at once."""
        loop = asyncio.get_running_loop()
        if err is not None and not self.cloud_available and self.config.edge_fallback:
            return None  # known to be away: the edge-only loop's background probe looks for it
        deadline = loop.time() + (self.config.reconnect_s if err else 0.0)
        n_urls = max(1, len(self.cloud_urls))
        if err is not None and n_urls > 1:
            self._url_index = (self._url_index + 1) % n_urls  # the lost one is tried last
        attempt = 0
        while True:
            if err is not None:
                # even the first retry waits its jittered share: a replica lost under 64 sessions
                # would otherwise take 64 reconnects to the next one in the same millisecond
                delay = backoff_delay(attempt, self.config.backoff_base_s, self.config.backoff_cap_s, self.rng)
                if attempt and loop.time() + delay > deadline:
                    break
                await asyncio.sleep(delay)
            attempt += 1
            try:
                # an attempt never runs past the deadline (one full attempt when there is none)
                left = deadline - loop.time()
                timeout = min(self.config.connect_timeout_s, left / n_urls) if left > 0.5 else None
                link = await self._session(options, fresh=True, connect_timeout_s=timeout)
                self.cloud_available = True
                return link
            except CloudError as last:
                if last.code not in RETRYABLE:
                    raise  # a refusal (token, model) will not change by retrying
                err = err or last
                if loop.time() >= deadline:
                    break
        if not self.config.edge_fallback:
            raise err
        self.cloud_available = False
        return None

    def _notice(self, text: str) -> None:
        """Tell the user once per change: an outage spanning answers is announced once."""
        if text != self._last_notice:
            self._last_notice = text
            self.on_notice(text)


def _stop_ids(drafter: Drafter, meta: dict) -> tuple[int, ...]:
    """End-of-sequence and end-of-turn ids: generation stops at whichever comes first."""
    ids = {drafter.token_eos()}
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eos_token_id"):
        if key in meta:
            try:
                ids.add(int(meta[key]))
            except ValueError:
                pass
    return tuple(sorted(i for i in ids if i >= 0))


__all__ = ["CloudError", "EdgeClient", "EdgeConfig"]
