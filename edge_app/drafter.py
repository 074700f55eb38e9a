"""The edge drafter: one small class over llama-cpp-python.

The drafter holds one sequence. Its only state that matters is `length`: how many tokens the KV
cache holds. After `feed`, `logits()` is the next-token distribution at position `length`.
Rolling back is moving that pointer (`llm.n_tokens = keep`); the next eval drops the rest of the
KV cache. Never torch here: this runs on a Pi.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from sampling import reusable_prefix


@dataclass(frozen=True)
class DrafterConfig:
    """How to run the draft model. threads None = all cores but one (at least one)."""

    model_path: str
    n_ctx: int = 4096
    threads: int | None = None
    n_batch: int = 512
    n_gpu_layers: int = 0  # >0 offloads layers on a CUDA build (Jetson)

    def resolved_threads(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 2) - 1)


class Drafter:
    """A GGUF draft model with one KV cache (implements edge_app.draft_model.DraftModel)."""

    def __init__(self, config: DrafterConfig):
        import llama_cpp  # imported here so that `import edge_app` works without it (tests, docs)

        self._llama_cpp = llama_cpp
        self.config = config
        threads = config.resolved_threads()
        self.llm = llama_cpp.Llama(
            model_path=config.model_path,
            n_ctx=config.n_ctx,
            n_batch=config.n_batch,
            n_threads=threads,
            n_threads_batch=threads,
            n_gpu_layers=config.n_gpu_layers,
            logits_all=False,  # n_ctx x n_vocab floats otherwise: gigabytes for a 152k vocabulary
            verbose=False,
        )
        self.n_vocab = int(self.llm.n_vocab())
        self.n_ctx = int(self.llm.n_ctx())

    # -- state -------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        """Tokens held in the KV cache."""
        return int(self.llm.n_tokens)

    @property
    def tokens(self) -> list[int]:
        """The tokens held in the KV cache, in order."""
        return [int(t) for t in self.llm.input_ids[: self.length]]

    def rollback(self, length: int) -> None:
        """Forget positions from `length` on (the next feed overwrites their KV entries)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll back to {length}: the cache holds {self.length}")
        self.llm.n_tokens = length

    def reset(self) -> None:
        self.rollback(0)

    # -- compute -----------------------------------------------------------------------------
    def feed(self, ids: list[int]) -> None:
        """Append ids to the sequence (one llama_decode per n_batch tokens)."""
        if not ids:
            return
        if self.length + len(ids) > self.n_ctx:
            raise ContextFullError(
                f"the draft context holds {self.n_ctx} tokens; {self.length} used, {len(ids)} more asked"
            )
        self.llm.eval(ids)

    def prefill(self, ids: list[int]) -> None:
        """Feed a prompt, keeping the longest cached prefix it shares with the current sequence.

        Multi-turn chat re-sends the whole conversation; only the new turn is computed.
        """
        keep = reusable_prefix(self.tokens, ids)
        self.rollback(keep)
        self.feed(ids[keep:])

    def logits(self) -> np.ndarray:
        """float32[n_vocab] next-token logits after the last fed token (a copy)."""
        ptr = self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    # -- text --------------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        """Text -> ids, chat-template tags parsed as special tokens; BOS only if the model wants one."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    def detokenize(self, ids: list[int]) -> bytes:
        """ids -> raw UTF-8 bytes (a multi-byte character may be split across tokens)."""
        return self.llm.detokenize(ids, special=False) if ids else b""

    def token_eos(self) -> int:
        return int(self.llm.token_eos())

    def metadata(self) -> dict[str, str]:
        return dict(self.llm.metadata)

    def system_info(self) -> str:
        return self._llama_cpp.llama_print_system_info().decode("utf-8", "replace")

    def close(self) -> None:
        self.llm.close()


class ContextFullError(RuntimeError):
    """The sequence would not fit the draft's context window."""
