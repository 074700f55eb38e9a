"""`make arm-check`: the PicoSpec edge on aarch64, under qemu-aarch64 user-mode emulation, on x86.

  0. setup:    arm/sysroot.sh (Debian arm64 python3.11 + the edge's aarch64 wheels) and
               arm/build_llama.sh (llama-cpp-python cross-compiled with Pi 5 flags; cached)
  1. tests:    the edge's torch-free tests, run by the emulated aarch64 Python
  2. generate: a native x86 verifier (the default target, under /tmp/picospec-heavy.lock), a 16-token
               greedy generation by the emulated aarch64 edge and by the native x86 edge against it;
               the token ids must be identical
  3. doctor:   `picospec doctor --json` under emulation: aarch64, and the llama.cpp build

Prints one PASS/FAIL line per step and exits non-zero on any FAIL. Run with the host's Python
(the x86 .venv's); only the edges and the tests run emulated.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARM = ROOT / "arm"
VENV = ROOT / ".venv"
CACHE = Path(os.environ.get("PICOSPEC_ARM_CACHE", Path.home() / ".cache/picospec/arm64"))
SYSROOT = CACHE / "sysroot"
SITE = SYSROOT / "opt/picospec/site-packages"
ARM_PY = SYSROOT / "usr/bin/python3.11"
ARM_PYW = SYSROOT / "usr/bin/python3-qemu"  # qemu-aarch64-static -L SYSROOT -0 $0 ARM_PY (arm/sysroot.sh)
QEMU = os.environ.get("QEMU", "qemu-aarch64-static")
HEAVY_LOCK = "/tmp/picospec-heavy.lock"

# The edge's tests that import no torch (directly, through cloud/, or through tests/tiny*.py).
# Left out: test_cloud_round, test_fuzz_server, test_pipeline_tiny, test_torch_rule (torch);
# test_faults_*, test_security, test_server_bad_input, test_observability, test_load_tiny (a torch
# verifier in-process); test_real_models (the real target); test_bench, test_models, test_layers,
# test_linkproxy, test_openai_server, test_repl (cloud- or host-side tooling, not the edge).
TEST_FILES = [
    "tests/test_codec.py", "tests/test_sampling.py", "tests/test_speculate_unit.py",
    "tests/test_edge_isolation.py", "tests/test_stats.py", "tests/test_meters.py",
    "tests/test_textstream.py", "tests/test_energy.py",
]
# single tests in those files that need torch, or that bound the wall time of native code (the
# emulator is 10-50x slower, so the bound says nothing about an aarch64 device there)
DESELECT = [
    "tests/test_edge_isolation.py::test_auto_dtype_picks_bf16_only_where_the_hardware_has_it",  # cloud.engine: torch
    "tests/test_meters.py::test_cheap_enough_to_call_per_token",  # < 50 us a token, native speed
]

PROMPT = "Write a Python function is_prime(n) that returns True when n is prime."
EMULATION_NOTE = (
    "emulation note: qemu-aarch64 user mode runs aarch64 code by translating it to x86, so it shows "
    "that the edge's code, its aarch64 wheels and the llama.cpp build work and give the same tokens; "
    "it cannot give an aarch64 device's speed (tok/s, draft ms, TTFT are the emulator's, 10-50x slow) "
    "nor energy (no Pi 5 PMIC, no Jetson INA3221: joules 'not measured'). Measure those on the device."
)

results: list[tuple[str, bool, str, float]] = []


def line(msg: str = "") -> None:
    print(msg, flush=True)


def record(name: str, ok: bool, detail: str, seconds: float) -> bool:
    results.append((name, ok, detail, seconds))
    line(f"{'PASS' if ok else 'FAIL'}: arm-check {name} ({seconds:.0f} s) {detail}")
    return ok


def emulated_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{ROOT}:{SITE}"
    # the x86 venv's variables must not leak into the aarch64 interpreter
    for var in ("VIRTUAL_ENV", "PYTHONHOME"):
        env.pop(var, None)
    return env


def emulated(*args: str) -> list[str]:
    """argv running the sysroot's aarch64 Python under qemu-user (nice'd: 2 shared cores), through
    the wrapper, so that its sys.executable (and every child interpreter) is emulated too."""
    return ["nice", "-n", "19", str(ARM_PYW), *args]


def step_setup() -> bool:
    t = time.monotonic()
    for script in ("sysroot.sh", "build_llama.sh"):
        r = subprocess.run(["bash", str(ARM / script)], cwd=ROOT)
        if r.returncode != 0:
            return record("setup", False, f"arm/{script} exited {r.returncode}", time.monotonic() - t)
    r = subprocess.run(emulated("-c", "import platform, llama_cpp; print(platform.machine(), llama_cpp.__version__)"),
                       cwd=ROOT, env=emulated_env(), capture_output=True, text=True)
    got = r.stdout.strip()
    return record("setup", r.returncode == 0 and got.startswith("aarch64 "),
                  f"sysroot {SYSROOT}: emulated python imports llama_cpp: {got or r.stderr[-500:]}",
                  time.monotonic() - t)


def step_tests() -> bool:
    t = time.monotonic()
    cmd = emulated("-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "arm.pytest_emulated",
                   "-o", "addopts=", "-rfEs", *TEST_FILES, *[f"--deselect={d}" for d in DESELECT])
    line(f"$ {QEMU} -L SYSROOT SYSROOT/usr/bin/python3.11 " + " ".join(cmd[4:]))
    r = subprocess.run(cmd, cwd=ROOT, env=emulated_env(), capture_output=True, text=True)
    out = r.stdout.strip().splitlines()
    tail = out[-1] if out else r.stderr.strip()[-300:]
    if r.returncode != 0:
        line("\n".join(out[-60:]))
        line(r.stderr[-3000:])
    else:
        line("\n".join(x for x in out if x.startswith("SKIPPED")))
    return record("tests", r.returncode == 0, f"(aarch64, emulated): {tail}", time.monotonic() - t)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, proc: subprocess.Popen, limit_s: float) -> bool:
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
                if resp.status == 200:
                    return True
        time.sleep(2)
    return False


def draft_path() -> str:
    r = subprocess.run([str(VENV / "bin/picospec"), "models", "--json"], cwd=ROOT, capture_output=True, text=True)
    info = json.loads(r.stdout)["draft"]
    if not info.get("ready"):
        raise RuntimeError(f"the draft model is not ready: {info.get('error')}")
    return info["path"]


def generate(argv: list[str], env: dict | None, label: str, log: Path) -> dict | None:
    t = time.monotonic()
    r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    log.write_text(r.stderr)
    if r.returncode != 0:
        line(f"{label} edge exited {r.returncode}:\n{r.stderr[-3000:]}")
        return None
    out = json.loads(r.stdout.strip().splitlines()[-1])
    s = out["stats"]
    line(f"{label:>22} edge: {time.monotonic() - t:6.1f} s wall, {s.get('new_tokens')} tokens, "
         f"acceptance {s.get('acceptance_rate')}, {s.get('rounds')} rounds, "
         f"{s.get('bytes_up')} B up / {s.get('bytes_down')} B down")
    return out


def step_generate(max_new: int, workdir: Path) -> bool:
    t = time.monotonic()
    draft = draft_path()
    line(f"waiting for {HEAVY_LOCK} (one real target at a time on this machine) ...")
    with open(HEAVY_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        line(f"lock held after {time.monotonic() - t:.0f} s")
        port = free_port()
        url = f"ws://127.0.0.1:{port}"
        server_log = open(workdir / "verifier.log", "w")
        server = subprocess.Popen(["nice", "-n", "10", str(VENV / "bin/picospec"), "serve", "--port", str(port)],
                                  cwd=ROOT, stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            t_load = time.monotonic()
            if not wait_healthy(port, server, 1800):
                server_log.flush()
                line((workdir / "verifier.log").read_text()[-3000:])
                return record("generate", False, "the x86 verifier did not come up", time.monotonic() - t)
            line(f"x86 verifier (default target) up on {url} after {time.monotonic() - t_load:.0f} s")
            common = ["generate", PROMPT, "--cloud", url, "--max-new-tokens", str(max_new), "--mode", "sync",
                      "--json", "--draft", draft]
            x86 = generate([str(VENV / "bin/picospec"), *common], None, "x86_64 (native)", workdir / "edge-x86.log")
            arm = generate(emulated("-m", "picospec.cli", *common), emulated_env(), "aarch64 (qemu-user)",
                           workdir / "edge-arm.log")
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
            server_log.close()
    if x86 is None or arm is None:
        return record("generate", False, "an edge failed (logs above)", time.monotonic() - t)
    ids_x86, ids_arm = x86["completions"][0]["token_ids"], arm["completions"][0]["token_ids"]
    line(f"prompt tokens  x86_64: {len(x86['prompt_token_ids'])}  aarch64: {len(arm['prompt_token_ids'])}  "
         f"identical: {x86['prompt_token_ids'] == arm['prompt_token_ids']}")
    line(f"x86_64  token_ids: {ids_x86}")
    line(f"aarch64 token_ids: {ids_arm}")
    line(f"text: {json.dumps(arm['completions'][0]['text'])}")
    same = ids_x86 == ids_arm and x86["prompt_token_ids"] == arm["prompt_token_ids"] and len(ids_arm) == max_new
    detail = (f"{len(ids_arm)} greedy tokens, aarch64 edge == x86 edge token for token" if same else
              f"token ids differ (x86 {len(ids_x86)}, aarch64 {len(ids_arm)} tokens)")
    return record("generate", same, detail, time.monotonic() - t)


def step_doctor(workdir: Path) -> bool:
    t = time.monotonic()
    r = subprocess.run(emulated("-m", "picospec.cli", "doctor", "--json"), cwd=ROOT, env=emulated_env(),
                       capture_output=True, text=True)
    if r.returncode != 0:
        return record("doctor", False, f"exited {r.returncode}: {r.stderr[-1000:]}", time.monotonic() - t)
    (workdir / "doctor-aarch64.json").write_text(r.stdout)
    d = json.loads(r.stdout)
    osd, lc, cpu = d.get("os", {}), d.get("llama_cpp", {}), d.get("cpu", {})
    sensors = [s["source"] for s in d.get("energy_sensors", []) if s.get("available")]
    line(f"doctor os.arch: {osd.get('arch')}  python: {osd.get('python')} ({osd.get('python_executable')})")
    line(f"doctor llama_cpp: version {lc.get('version')}, installed {lc.get('installed')}, "
         f"gpu_offload {lc.get('gpu_offload')}")
    line(f"doctor llama_cpp.system_info: {lc.get('system_info')}")
    line(f"doctor cpu: model {cpu.get('model')!r}, arm_core {cpu.get('arm_core')}, features {cpu.get('features')}")
    line(f"doctor energy sensors available: {sensors or 'none'}")
    line(f"doctor recommendations: threads {d.get('recommendations', {}).get('threads')}, "
         f"mode {d.get('recommendations', {}).get('mode')}")
    says = json.dumps(d).lower()
    if "emulat" not in says:
        line("doctor does not say it runs under emulation; arm-check says it instead:")
    line(EMULATION_NOTE)
    info = lc.get("system_info") or ""
    ok = osd.get("arch") == "aarch64" and lc.get("installed") and "NEON = 1" in info and "DOTPROD = 1" in info
    return record("doctor", bool(ok), f"arch {osd.get('arch')}, llama.cpp {lc.get('version')} built with "
                  f"{'NEON+DOTPROD' if ok else info!r}", time.monotonic() - t)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default="setup,tests,generate,doctor")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--workdir", default=str(CACHE / "last-run"), help="logs and doctor JSON")
    args = p.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    steps = args.steps.split(",")
    t0 = time.monotonic()
    if "setup" in steps and not step_setup():
        steps = []  # nothing else can run without the sysroot
    if "tests" in steps:
        step_tests()
    if "generate" in steps:
        step_generate(args.max_new_tokens, workdir)
    if "doctor" in steps:
        step_doctor(workdir)
    failed = [name for name, ok, _, _ in results if not ok]
    line(f"arm-check: {len(results) - len(failed)} passed, {len(failed)} failed in {time.monotonic() - t0:.0f} s"
         f" (logs: {workdir})")
    line("arm-check: PASS" if results and not failed else f"arm-check: FAIL ({', '.join(failed) or 'nothing ran'})")
    return 0 if results and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
