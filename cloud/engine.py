"""The cloud's target engine: one small class over a transformers causal LM and its KV cache.

Positions are explicit: `cache_len` is how many tokens the KV cache holds, and rolling back is
cropping the cache to a length, never a rebuild.
"""
from __future__ import annotations

import ctypes
import os
import threading
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from sampling import common_prefix_len


@dataclass(frozen=True)
class EngineConfig:
    """How to run the target. dtype: "auto", "bfloat16", "float16" or "float32"; device: "cpu",
    "cuda" or "auto". fast_linear: the CPU row-streaming matmul for float32 (cloud/kernels.py);
    None follows the environment (PICOSPEC_FAST_LINEAR, default on)."""

    dtype: str = "auto"
    device: str = "auto"
    threads: int | None = None
    fast_linear: bool | None = None

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return auto_dtype(self.resolved_device())


def auto_dtype(device: str, cpu_flags: set[str] | None = None) -> str:
    """bfloat16 where the hardware computes it natively (CUDA, or a CPU with AMX / AVX-512 BF16);
    float32 elsewhere: on an AVX2-only CPU torch emulates bf16 matmuls and a verify pass of the
    1.5B target was measured 2-4x slower in bf16 than in fp32."""
    if device.startswith("cuda"):
        return "bfloat16"
    flags = cpu_flags if cpu_flags is not None else _cpu_flags()
    return "bfloat16" if flags & {"amx_bf16", "avx512_bf16"} else "float32"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# glibc's malloc: allocations above this size come from the heap, not from fresh mmap'ed pages.
# A k-token pass allocates ~1-5 MB temporaries (activations, expanded keys, logits rows); fresh
# pages cost a page fault each 4 KB, which measured ~1 ms a layer at k = 8 on the 1.5B target.
_MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit
_TRIM_THRESHOLD = 256 << 20  # keep up to this much freed heap instead of returning it to the OS
_cpu_runtime_tuned = False


def tune_cpu_runtime() -> list[str]:
    """Process-wide settings that make a CPU forward pass of a few tokens cheaper, with the same
    arithmetic. Call after the weights are loaded (so they keep their own mmap'ed pages).
    Returns what was changed; idempotent.

    - malloc keeps pass-sized temporaries on its heap (no page faults a pass);
    - grouped-query attention with a mask (a verify pass after a cache) lets SDPA index the shared
      key/value heads instead of copying them once per query head (transformers does so by itself
      only without a mask, i.e. for one-token passes).
    """
    global _cpu_runtime_tuned
    if _cpu_runtime_tuned:
        return []
    _cpu_runtime_tuned = True
    done = []
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt's parameter numbers (malloc.h)
        if libc.mallopt(m_mmap_threshold, _MMAP_THRESHOLD) and libc.mallopt(m_trim_threshold, _TRIM_THRESHOLD):
            done.append("malloc: pass temporaries on the heap")
    except (OSError, AttributeError):  # not glibc (musl, macOS): the defaults stay
        pass
    if os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1") == "1":
        done.append("sdpa: grouped-query attention without copying key/value heads")
    return done


DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
          "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}


class TargetEngine:
    """A target model with one sequence's KV cache.

    Not thread-safe by itself; the server gives each session its own engine state and runs
    forward passes one at a time on a worker thread (see `model_lock`).
    """

    def __init__(self, model, tokenizer=None, device: str = "cpu", model_lock: threading.Lock | None = None,
                 kernels: str = "stock torch linears"):
        self.model = model.eval()
        self.kernels = kernels  # what the linear layers run (accelerate_linears' description)
        self.tokenizer = tokenizer
        self.device = device
        self.vocab_size = int(model.config.vocab_size)
        # One lock per model: CPU forward passes of different sessions would only fight for cores.
        self.model_lock = model_lock or threading.Lock()
        self.cache = self._new_cache()
        self.forward_passes = 0

    @classmethod
    def load(cls, spec, config: EngineConfig = EngineConfig()) -> "TargetEngine":
        """Load a target (a models.ModelSpec) with its cached safetensors copy."""
        from models.target_cache import load_target

        if config.threads:
            torch.set_num_threads(config.threads)
        device = config.resolved_device()
        model, tokenizer = load_target(spec, dtype=config.resolved_dtype(), device=device)
        return cls.from_model(model, tokenizer, device, fast_linear=config.fast_linear)

    @classmethod
    def from_model(cls, model, tokenizer=None, device: str = "cpu", fast_linear: bool | None = None) -> "TargetEngine":
        """An engine over loaded weights as the server runs them: on the CPU, the row-streaming
        linear kernel (cloud/kernels.py; fast_linear None follows PICOSPEC_FAST_LINEAR, and it is a
        no-op for a non-float32 model) and the process-wide runtime settings (tune_cpu_runtime)."""
        kernels = "stock torch linears"
        if device == "cpu":
            from cloud.kernels import accelerate_linears

            kernels = accelerate_linears(model, enabled=fast_linear)
            tune_cpu_runtime()
        return cls(model, tokenizer, device, kernels=kernels)

    def fork(self) -> "TargetEngine":
        """A new engine state (empty cache) sharing this one's weights and model lock."""
        return TargetEngine(self.model, self.tokenizer, self.device, self.model_lock, self.kernels)

    def _new_cache(self) -> DynamicCache:
        cache = DynamicCache(config=self.model.config)
        # sliding-window layers (Gemma 3) forget the past unless asked to keep it for rollback
        if hasattr(cache, "activate_past_recording"):
            try:
                cache.activate_past_recording()
            except Exception:  # layers without a window have nothing to record
                pass
        return cache

    @property
    def cache_len(self) -> int:
        return int(self.cache.get_seq_length())

    def reset(self) -> None:
        self.cache = self._new_cache()

    def forward(self, ids: list[int], last_only: bool = False) -> torch.Tensor:
        """Feed ids after the cache; returns float32 logits [len(ids), V] on the target's device
        ([1, V] with last_only: only the last row is computed, as a prefill needs). They stay
        there: the rule reads them where they are (cloud/rule_impl.py), only token ids leave.

        Row i is the target's next-token logits after ids[i]: for a verify pass fed with
        [last committed?] + drafted, the rows give the distribution at every drafted position and at
        the position after the block, in one forward pass.
        """
        return self._pass(ids, last_only)

    @torch.inference_mode()
    def _pass(self, ids: list[int], last_only: bool) -> torch.Tensor:
        if not ids:
            raise ValueError("forward needs at least one token")
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        with self.model_lock:
            # logits_to_keep=0 keeps every row; 1 runs the output layer on the last row only
            out = self.model(input_ids=x, cache=self.cache, use_cache=True,
                             logits_to_keep=1 if last_only else 0)
            self.forward_passes += 1
        logits = out.logits[0]  # [rows, V], on the target's device
        return logits if logits.dtype == torch.float32 else logits.float()

    def prefill(self, ids: list[int], chunk: int = 512) -> torch.Tensor:
        """Feed a prompt (in chunks, so a long prompt does not spike memory); returns last logits [V]
        on the target's device. Every chunk computes the output layer for its last row only."""
        last = None
        for start in range(0, len(ids), chunk):
            last = self._pass(ids[start:start + chunk], last_only=True)[-1]
        return last

    def rollback(self, length: int) -> None:
        """Drop cached positions from `length` on."""
        remove = self.cache_len - length
        if remove < 0:
            raise ValueError(f"cannot roll back to {length}: the cache holds {self.cache_len}")
        if remove:  # crop(0) is not a no-op everywhere, and a positive argument raises in 5.x
            self.cache.crop(-remove)

    @property
    def can_share_rows(self) -> bool:
        """Whether cached rows can be copied between sessions: every layer keeps all its
        positions (a sliding-window layer does not)."""
        return not any(getattr(layer, "is_sliding", False) for layer in self.cache.layers)

    def export_rows(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of the first n cached positions: [(keys, values)] per layer, each
        [1, kv_heads, n, head_dim]."""
        if n > self.cache_len:
            raise ValueError(f"cannot export {n} positions: the cache holds {self.cache_len}")
        return [(layer.keys[:, :, :n].clone(), layer.values[:, :, :n].clone()) for layer in self.cache.layers]

    def import_rows(self, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Replace the cache with exported rows (copied: the source stays untouched by this
        session's later passes)."""
        self.reset()
        for i, (k, v) in enumerate(kv):
            self.cache.update(k.clone(), v.clone(), i)

    def common_prefix_keep(self, committed: list[int], new: list[int]) -> int:
        """How many cached positions of `committed` can be kept for the new context `new`."""
        return min(common_prefix_len(committed, new), self.cache_len)


def measure_verify_curve(engine: TargetEngine, ks=(1, 2, 4, 8, 16), context: int = 200,
                         repeats: int = 3, seed: int = 0, clock=time.perf_counter) -> dict[int, float]:
    """Seconds per forward pass of k tokens after a `context`-token cache: {k: min over repeats}.

    Each measurement starts from a fresh cache holding a random context (prefilled once per
    repeat), then times one `forward` of k random ids. Uses a fork: the engine's own cache is left
    alone. Timings do not depend on the weights' or the ids' values. `clock`: wall time by default;
    time.thread_time gives CPU time, steadier on a shared machine when torch runs one thread.
    """
    probe = engine.fork()
    g = torch.Generator().manual_seed(seed)
    vocab = engine.vocab_size
    curve: dict[int, float] = {}
    for k in ks:
        best = float("inf")
        for _ in range(repeats):
            probe.reset()
            probe.prefill(torch.randint(0, vocab, (context,), generator=g).tolist())
            ids = torch.randint(0, vocab, (k,), generator=g).tolist()
            t0 = clock()
            probe.forward(ids)
            best = min(best, clock() - t0)
        curve[k] = best
    return curve


def greedy_reference(engine: TargetEngine, prompt: list[int], max_new_tokens: int,
                     eos_id: int | None) -> tuple[list[int], float]:
    """The target alone, greedy, one token per forward pass: the output speculation must equal.

    Returns (generated ids, seconds).
    """
    t0 = time.perf_counter()
    engine.reset()
    logits = engine.prefill(prompt)
    out: list[int] = []
    while len(out) < max_new_tokens:
        token = int(torch.argmax(logits))
        out.append(token)
        if token == eos_id or len(out) >= max_new_tokens:
            break
        logits = engine.forward([token])[-1]
    return out, time.perf_counter() - t0
