"""Session-scoped real models: each is loaded once per test session.

The real target runs in fp32 here: batched verify passes and one-token passes then agree to ~1e-5
in a logit, so greedy equality is a fair test (in bf16 the two differ by up to ~0.3 in a logit,
enough to flip a near-tie).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def default_models():
    """(draft path, target path) of the default pair, joined and checked."""
    from models.resolve import ensure_ready, resolve_draft, resolve_target

    return ensure_ready(resolve_draft(None)), ensure_ready(resolve_target(None))


@pytest.fixture(scope="session")
def real_target(default_models):
    """The default target in fp32, one engine for the session (forked per use)."""
    import torch

    from cloud.engine import EngineConfig, TargetEngine
    from models.resolve import resolve_target

    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    spec = resolve_target(None)
    spec = type(spec)(**{**spec.__dict__, "path": default_models[1]})
    return TargetEngine.load(spec, EngineConfig(dtype="float32", device="cpu"))


@pytest.fixture(scope="session")
def on_reference_target(default_models):
    """run(work) -> work(model): the default target in fp32 as transformers loads it from the
    models layer, independent of the verifier's engine (cloud.engine), for reference outputs.

    A second copy of the weights, so it is loaded for one call and freed after it."""
    import gc

    import torch

    from models.resolve import resolve_target
    from models.target_cache import load_target

    spec = resolve_target(None)
    spec = type(spec)(**{**spec.__dict__, "path": default_models[1]})

    def run(work):
        torch.set_num_threads(max(1, (os.cpu_count() or 2)))
        model, _ = load_target(spec, dtype="float32", device="cpu")
        try:
            return work(model)
        finally:
            del model
            gc.collect()

    return run


@pytest.fixture(scope="session")
def real_server(real_target, default_models):
    """The real aiohttp verifier over a real socket, serving the fp32 target."""
    from models.fingerprint import from_gguf
    from tests.tiny import ServerThread

    with ServerThread(real_target, fp=from_gguf(default_models[1]).to_dict()) as server:
        yield server


@pytest.fixture(scope="session")
def real_edge(real_server, default_models):
    """The real llama.cpp drafter talking to the real server (PicoSpec API)."""
    from picospec.api import PicoSpec

    ps = PicoSpec(draft=str(default_models[0]), cloud=real_server.url, pin_cores=False)
    yield ps
    ps.close()
