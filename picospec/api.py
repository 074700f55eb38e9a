"""The Python API: PicoSpec(...).generate(prompt) -> the same dict `picospec generate --json` prints.

    from picospec.api import PicoSpec
    with PicoSpec() as ps:                       # starts a local verifier with the default pair
        out = ps.generate("Write is_prime in Python", max_new_tokens=64)
        print(out["completions"][0]["text"], out["stats"]["tokens_per_s"])

Runs its own event loop on a background thread, so it works from plain synchronous code.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import replace

from edge_app.client import EdgeClient, EdgeConfig
from edge_app.pipeline import GenerateOptions
from edge_app.stats import merge_stats
from sampling import SamplingParams


class PicoSpec:
    def __init__(self, draft: str | None = None, cloud: str | None = None, target: str | None = None,
                 token: str | None = None, dtype: str = "auto", threads: int | None = None,
                 cloud_threads: int | None = None, pin_cores: bool = True, need_cloud: bool = True,
                 **faults):
        """faults: more EdgeConfig fields (reply_timeout_s, reconnect_s, edge_fallback,
        retry_interval_s, connect_timeout_s, ca_cert)."""
        config = EdgeConfig(draft=draft, cloud=cloud, target=target, token=token, dtype=dtype,
                            threads=threads, cloud_threads=cloud_threads, pin_cores=pin_cores, **faults)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="picospec-loop")
        self._thread.start()
        self.client = EdgeClient(config)
        self._call(self.client.start(need_cloud=need_cloud))

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def generate(self, prompt: str | list[int], *, raw: bool = False, system: str | None = None,
                 max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, n: int = 1, mode: str = "auto", variant: str = "exact",
                 paper_top_k: int = 8, block: int | None = None, run_ahead: int | None = None,
                 cut_below: float = 0.5, on_commit=None) -> dict:
        """Generate n completions; prompt is text (chat-templated unless raw) or token ids."""
        return self._call(generate_async(
            self.client, prompt, raw=raw, system=system, n=n, on_commit=on_commit,
            options=GenerateOptions(
                max_new_tokens=max_new_tokens,
                params=SamplingParams(temperature, top_p, top_k, seed).validate(),
                mode=mode, variant=variant, paper_top_k=paper_top_k, block=block, run_ahead=run_ahead,
                cut_below=cut_below)))

    def close(self) -> None:
        try:
            self._call(self.client.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> "PicoSpec":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


async def generate_async(client: EdgeClient, prompt: str | list[int], *, options: GenerateOptions,
                         raw: bool = False, system: str | None = None, n: int = 1, on_commit=None) -> dict:
    """n independent completions of one prompt, with their stats, as a JSON-ready dict."""
    ids = list(prompt) if isinstance(prompt, list) else client.encode_prompt(prompt, raw=raw, system=system)
    completions = []
    for i in range(n):
        seed = options.params.seed
        opts = options if seed is None else replace(options, params=replace(options.params, seed=seed + i))
        answer = await client.generate_ids(ids, opts, on_commit)
        completions.append({
            "index": i,
            "token_ids": answer.token_ids,
            "text": client.decode(answer.token_ids),
            "finish_reason": answer.finish_reason,
            # ranges of token_ids that the draft alone produced while the verifier was away
            "edge_only_spans": [list(span) for span in answer.edge_only_spans],
            "target_quality": options.mode != "edge" and not answer.edge_only_spans,
            "stats": answer.stats.to_dict(),
        })
    return {
        "prompt_token_ids": ids,
        "mode": options.mode,
        "variant": options.variant,
        "completions": completions,
        "stats": merge_stats([c["stats"] for c in completions]),
        "draft": client.draft_name,
        "cloud": client.cloud_url,
        "target_quality": all(c["target_quality"] for c in completions),
    }

