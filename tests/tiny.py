"""Tiny real models for fast tests of the protocol and the pipeline.

A randomly initialised Qwen2 of a few thousand parameters is a real transformers model with a real
KV cache: the verifier runs its real code path on it in milliseconds. A second one, a perturbed
copy, plays the draft, so that drafts are sometimes accepted and sometimes not.
"""
from __future__ import annotations

import asyncio
import hashlib
import threading
import time

import numpy as np
import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from cloud.engine import TargetEngine
from cloud.server import ServerConfig, VerifierServer
from edge_app.draft_model import TokenListDrafter

VOCAB = 64
EOS = 63


def tiny_model(seed: int = 0, vocab: int = VOCAB) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         eos_token_id=EOS, bos_token_id=None, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config).eval()
    # sharpen the output layer so greedy choices are not near-ties
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def perturbed(model: Qwen2ForCausalLM, scale: float, seed: int = 1) -> Qwen2ForCausalLM:
    """A copy of `model` with noise on its output layer: a draft that agrees often, not always."""
    copy = tiny_model(0, model.config.vocab_size)
    copy.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = copy.lm_head.weight
        w.add_(torch.randn(w.shape, generator=g) * scale * w.std())
    return copy


def fingerprint(vocab: int = VOCAB, eos: int = EOS) -> dict:
    tokens = "\n".join(f"t{i}" for i in range(vocab)).encode()
    return {"vocab_size": vocab, "bos_id": None, "eos_id": eos,
            "tokens_sha256": hashlib.sha256(tokens).hexdigest(), "n_tokens": vocab}


class SlowEngine(TargetEngine):
    """A real engine whose forward passes take at least `delay_s` (a slow cloud)."""

    delay_s = 0.0

    def forward(self, ids, last_only=False):
        t0 = time.perf_counter()
        out = super().forward(ids, last_only)
        time.sleep(max(0.0, self.delay_s - (time.perf_counter() - t0)))
        return out

    def fork(self):
        e = SlowEngine(self.model, self.tokenizer, self.device, self.model_lock)
        e.delay_s = self.delay_s
        return e


class TinyDrafter(TokenListDrafter):
    """The Drafter interface over a tiny torch model (tests only: the real edge uses llama.cpp)."""

    def __init__(self, model: Qwen2ForCausalLM, step_delay_s: float = 0.0):
        super().__init__()
        self.model = model
        self.step_delay_s = step_delay_s
        self.cache = DynamicCache(config=model.config)
        self._logits: np.ndarray | None = None
        self.n_vocab = model.config.vocab_size
        self.lock = threading.Lock()

    def rollback(self, length: int) -> None:
        remove = self.length - length
        if remove:
            self.cache.crop(-remove)
        super().rollback(length)
        self._logits = None

    @torch.inference_mode()
    def feed(self, ids: list[int]) -> None:
        if not ids:
            return
        out = self.model(input_ids=torch.tensor([ids]), cache=self.cache, use_cache=True)
        super().feed(ids)
        self._logits = out.logits[0, -1].float().numpy().copy()
        if self.step_delay_s:
            time.sleep(self.step_delay_s)

    def logits(self) -> np.ndarray:
        return self._logits

    def close(self) -> None:  # EdgeClient.close() closes its drafter
        pass

    def detokenize(self, ids: list[int]) -> bytes:
        """Text for EdgeClient.decode: token i is "t<i> " (the tiny fingerprint's vocabulary)."""
        return "".join(f"t{i} " for i in ids).encode()


class ServerThread:
    """A VerifierServer on its own event loop in a background thread, over a real socket."""

    def __init__(self, engine, config: ServerConfig | None = None, fp: dict | None = None):
        self.server = VerifierServer(engine, fp or fingerprint(), "tiny-qwen2",
                                     config or ServerConfig(port=0))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(30)
        return self

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
