"""The edge on aarch64, under qemu-user emulation, against the real verifier (an optional platform
check; `make arm-check` is the whole of it).

These tests need the arm64 sysroot and the cross-compiled aarch64 llama.cpp that `make arm-check`
builds into ~/.cache/picospec/arm64 (about 20 minutes on 2 cores, once). Where that cache is absent,
as on a new machine, they skip and say so; they never build it. With the cache they cost about two
minutes on top of the real-model tests: the verifier is the session's real target, already loaded.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

CACHE = Path(os.environ.get("PICOSPEC_ARM_CACHE", Path.home() / ".cache/picospec/arm64"))
SYSROOT = CACHE / "sysroot"
SITE = SYSROOT / "opt/picospec/site-packages"
PYW = SYSROOT / "usr/bin/python3-qemu"  # qemu-aarch64-static -L SYSROOT ... python3.11 (arm/sysroot.sh)
PROMPT = "Write a Python function is_prime(n) that returns True when n is prime."
N = 16


def _missing() -> str | None:
    if shutil.which("qemu-aarch64-static") is None:
        return "qemu-aarch64-static is not installed"
    if not PYW.exists() or not (SITE / ".pkgs-done").exists():
        return f"no arm64 sysroot in {CACHE}"
    if not (SITE / "llama_cpp/lib/libllama.so").exists():
        return f"no aarch64 llama-cpp-python in {SITE}"
    return None


_REASON = _missing()
# decided at collection, so that a skip loads no real model
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(_REASON is not None, reason=f"optional aarch64 check: {_REASON}; "
                                 "`make arm-check` builds it (~20 min, once)")]


@pytest.fixture(scope="module")
def arm_python():
    def run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": f"{ROOT}:{SITE}"}
        env.pop("VIRTUAL_ENV", None)
        return subprocess.run(["nice", "-n", "19", str(PYW), *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)

    return run


def test_emulated_aarch64_edge_gives_the_x86_edges_tokens(arm_python, real_edge, real_server, default_models):
    x86 = real_edge.generate(PROMPT, max_new_tokens=N, mode="sync")
    r = arm_python("-m", "picospec.cli", "generate", PROMPT, "--cloud", real_server.url, "--draft",
                   str(default_models[0]), "--max-new-tokens", str(N), "--mode", "sync", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    arm = json.loads(r.stdout.strip().splitlines()[-1])
    assert arm["prompt_token_ids"] == x86["prompt_token_ids"]
    assert len(arm["completions"][0]["token_ids"]) == N
    assert arm["completions"][0]["token_ids"] == x86["completions"][0]["token_ids"]


def test_emulated_doctor_reports_aarch64_and_the_arm_build(arm_python):
    r = arm_python("-m", "picospec.cli", "doctor", "--json", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(r.stdout)
    assert d["os"]["arch"] == "aarch64"
    assert d["llama_cpp"]["installed"] is True, d["llama_cpp"]
    info = d["llama_cpp"]["system_info"]
    assert "NEON = 1" in info and "DOTPROD = 1" in info and "AVX" not in info, info
