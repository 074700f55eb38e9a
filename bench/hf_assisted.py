"""The co-located peer: Hugging Face assisted generation, draft and target on the same (cloud) cores.

Run as `python -m bench.hf_assisted --job JOB.json`; the benchmark starts it pinned to the cloud
cores. It loads the target with models.target_cache.load_target (same dtype as our verifier) and the
draft GGUF through transformers the same way (load_target on the draft's spec: transformers
dequantises the GGUF, so this draft computes in `dtype`, not in llama.cpp's Q4 kernels, and its
proposals can differ slightly from ours; the dequantised copy is cached like the target's).
It prints one JSON object per line on stdout: {"event": "ready", ...}, then one per prompt:
{"event": "answer", "index", "token_ids", "tokens", "seconds", "ttft_s", "commits": [[t, n], ...]}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


class CommitTimes:
    """A transformers streamer that notes when each verified group of tokens arrives."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.commits: list[tuple[float, int]] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() first puts the prompt itself
            self._prompt_seen = True
            return
        self.commits.append((time.perf_counter() - self.t0, int(value.numel())))

    def end(self) -> None:
        pass


def _load(role: str, path: str | None, dtype: str):
    from models.resolve import ensure_ready, resolve_draft, resolve_target
    from models.target_cache import load_target

    spec = resolve_draft(path) if role == "draft" else resolve_target(path)
    ready = ensure_ready(spec)
    spec = type(spec)(**{**spec.__dict__, "path": ready})
    if dtype == "auto":  # the same choice our verifier makes
        from cloud.engine import auto_dtype

        dtype = auto_dtype("cpu")
    model, _tokenizer = load_target(spec, dtype=dtype)
    return model, spec.name


def _answer(target, draft, ids: list[int], max_new: int, eos: list[int], assistant_tokens: int | None) -> dict:
    import torch

    streamer = CommitTimes()
    x = torch.tensor([ids], dtype=torch.long)
    kwargs = {"num_assistant_tokens": assistant_tokens} if assistant_tokens else {}
    with torch.inference_mode():
        out = target.generate(x, attention_mask=torch.ones_like(x), assistant_model=draft, do_sample=False,
                              max_new_tokens=max_new, eos_token_id=eos or None, pad_token_id=(eos or [0])[0],
                              streamer=streamer, **kwargs)
    seconds = time.perf_counter() - streamer.t0
    new = out[0, len(ids):].tolist()
    ttft = streamer.commits[0][0] if streamer.commits else None
    return {"token_ids": new, "tokens": len(new), "seconds": seconds, "ttft_s": ttft, "commits": streamer.commits}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hf_assisted", description=__doc__.split("\n")[0])
    p.add_argument("--job", required=True, help="JSON: {target, draft, dtype, threads, max_new_tokens, eos, "
                   "assistant_tokens, prompts: [[ids...], ...]}")
    args = p.parse_args(argv)
    job = json.loads(Path(args.job).read_text())
    import torch

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    t0 = time.perf_counter()
    target, target_name = _load("target", job.get("target"), job["dtype"])
    draft, draft_name = _load("draft", job.get("draft"), job["dtype"])
    load_s = time.perf_counter() - t0
    eos, max_new, k = job.get("eos") or [], int(job["max_new_tokens"]), job.get("assistant_tokens")
    _answer(target, draft, job["prompts"][0], 4, eos, k)  # warm-up, not timed
    config = draft.generation_config
    print(json.dumps({"event": "ready", "load_s": load_s, "target": target_name, "draft": draft_name,
                      "threads": torch.get_num_threads(), "dtype": job["dtype"],
                      "num_assistant_tokens": k or config.num_assistant_tokens,
                      "num_assistant_tokens_schedule": config.num_assistant_tokens_schedule,
                      "assistant_confidence_threshold": config.assistant_confidence_threshold}), flush=True)
    for i, ids in enumerate(job["prompts"]):
        print(json.dumps({"event": "answer", "index": i, **_answer(target, draft, ids, max_new, eos, k)}), flush=True)
    return 0


# -- the parent's side ---------------------------------------------------------------------------
class HfAssistedError(RuntimeError):
    pass


def run_subprocess(job: dict, job_path: Path, cores: set[int] | None,
                   log_path: Path | None = None) -> Iterator[dict]:
    """Start `python -m bench.hf_assisted` on `cores` and yield its JSON events as they come."""
    job_path.write_text(json.dumps(job))
    repo_root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo_root), os.environ.get("PYTHONPATH")])))
    stderr = open(log_path, "w") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "bench.hf_assisted", "--job", str(job_path)],
                            stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
                            preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
    try:
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a library's print, not ours
            yield event
        if proc.wait() != 0:
            tail = Path(log_path).read_text()[-2000:] if log_path else ""
            raise HfAssistedError(f"hf-assisted exited with {proc.returncode}{': ' + tail if tail else ''}")
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=20)
        if log_path:
            stderr.close()


if __name__ == "__main__":
    sys.exit(main())
