"""Start a verifier on this machine in its own process (the "embedded" cloud).

It is a real server over a real socket, the same one `picospec serve` runs; only its address is
local. Running it as a separate process keeps torch out of the edge process and lets the two sides
take separate cores, as they would on two machines.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time


class EmbeddedVerifierError(RuntimeError):
    pass


def split_cores() -> tuple[set[int], set[int]] | None:
    """(edge cores, cloud cores): the first half for the edge, the rest for the cloud."""
    try:
        cores = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return None
    if len(cores) < 2:
        return None
    half = len(cores) // 2
    return set(cores[:half]), set(cores[half:])


class EmbeddedVerifier:
    """`python -m cloud.cli --port 0 ...` as a child process; `.url` once it is ready."""

    def __init__(self, target: str | None = None, dtype: str = "auto", threads: int | None = None,
                 cores: set[int] | None = None, token: str | None = None, extra_args: list[str] = (),
                 startup_timeout_s: float = 900.0, log_path: str | None = None):
        self.args = [sys.executable, "-m", "cloud.cli", "--host", "127.0.0.1", "--port", "0",
                     "--dtype", dtype, "--log-level", "WARNING", *extra_args]
        if target:
            self.args += ["--target", str(target)]
        if threads:
            self.args += ["--threads", str(threads)]
        self.cores = cores
        self.token = token
        self.startup_timeout_s = startup_timeout_s
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self._stderr_tail: list[str] = []

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self) -> "EmbeddedVerifier":
        env = dict(os.environ)
        if self.token:
            env["PICOSPEC_TOKEN"] = self.token
        cores = self.cores

        def in_child() -> None:
            # its own process group: a Ctrl-C at the terminal is meant for the edge command (the
            # chat stops an answer on it), not for its verifier, which the edge stops on exit
            os.setpgid(0, 0)
            if cores:
                os.sched_setaffinity(0, cores)

        self.proc = subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=in_child,
        )
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        deadline = time.monotonic() + self.startup_timeout_s
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "ready":
                self.port = int(event["port"])
                return self
            if time.monotonic() > deadline:
                break
        self.stop()
        tail = "".join(self._stderr_tail[-20:])
        raise EmbeddedVerifierError(f"the local verifier did not start:\n{tail}")

    def _drain_stderr(self) -> None:
        log = open(self.log_path, "a") if self.log_path else None
        for line in self.proc.stderr:
            self._stderr_tail.append(line)
            del self._stderr_tail[:-200]
            if log:
                log.write(line)
                log.flush()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "EmbeddedVerifier":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
