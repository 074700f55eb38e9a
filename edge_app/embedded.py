"""Start a verifier on this machine in its own process (the "embedded" cloud).

It is a real server over a real socket, the same one `picospec serve` runs; only its address is
local. Running it as a separate process keeps torch out of the edge process and lets the two sides
take separate cores, as they would on two machines.

The child never outlives its parent, however the parent ends (a closed terminal's SIGHUP, SIGTERM,
SIGKILL, a crash): it sits in its own process group (so a Ctrl-C is the edge's alone), so nothing
else would end it. Two ties, either enough on its own:

- Linux: the parent-death signal (prctl PR_SET_PDEATHSIG), set between fork and exec. The kernel
  sends it when the *thread* that forked the child ends, so every child is forked from one
  long-lived launcher thread of this module, never from a pool worker that may end early. A parent
  that died between fork and prctl is caught by comparing getppid() with the pid it had.
- Everywhere: the child runs under a small launcher (`python -m edge_app.embedded --parent PID
  MODULE ARGS...`) whose watcher thread sees its parent pid change (reparented to init or a
  subreaper) and ends the process: SIGTERM to itself, SIGKILL after a grace period.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

PR_SET_PDEATHSIG = 1
DEATH_SIGNAL = signal.SIGTERM  # the verifier's own handler closes its sessions on it
WATCH_INTERVAL_S = 0.5  # how often the child's watcher looks at its parent pid
KILL_GRACE_S = 5.0  # after the parent is gone: SIGTERM, then SIGKILL if still alive this much later


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


# -- tying a child's life to this process ------------------------------------------------------
def _libc_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl()  # looked up before any fork: a preexec_fn should do as little as it can


def set_parent_death_signal(sig: int = DEATH_SIGNAL, expected_parent: int | None = None) -> bool:
    """Ask Linux to send `sig` to this process when its parent (thread) ends; False where there is
    no prctl. If the parent is already gone (getppid() is no longer `expected_parent`), the
    signal is sent now: the kernel would not send it for a death that happened before the call."""
    if _PRCTL is None or os.environ.get("PICOSPEC_PDEATHSIG") == "0":  # "0": the watcher alone (tests)
        return False
    ok = _PRCTL(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    if expected_parent is not None and os.getppid() != expected_parent:
        os.kill(os.getpid(), sig)
    return ok


class _Launcher:
    """One long-lived daemon thread that forks every child: PR_SET_PDEATHSIG follows the forking
    thread, and this one ends only with the process."""

    def __init__(self):
        self._requests: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def popen(self, *args, **kwargs) -> subprocess.Popen:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, daemon=True, name="picospec-launcher")
                self._thread.start()
        done: queue.Queue = queue.Queue(maxsize=1)
        self._requests.put((args, kwargs, done))
        ok, value = done.get()
        if not ok:
            raise value
        return value

    def _serve(self) -> None:
        while True:
            args, kwargs, done = self._requests.get()
            try:
                done.put((True, subprocess.Popen(*args, **kwargs)))
            except BaseException as err:  # handed back to the caller's thread
                done.put((False, err))


_launcher = _Launcher()


def launch_tied(module: str, args: list[str], *, cores: set[int] | None = None,
                own_group: bool = True, python: str = sys.executable, **popen_kwargs) -> subprocess.Popen:
    """`python -m MODULE ARGS` as a child that ends when this process ends (both ties above)."""
    parent = os.getpid()

    def in_child() -> None:
        if own_group:
            # its own process group: a Ctrl-C at the terminal is meant for the edge command (the
            # chat stops an answer on it), not for its verifier, which the edge stops on exit
            os.setpgid(0, 0)
        if cores:
            os.sched_setaffinity(0, cores)
        set_parent_death_signal(DEATH_SIGNAL, expected_parent=parent)

    cmd = [python, "-m", "edge_app.embedded", "--parent", str(parent), module, *args]
    return _launcher.popen(cmd, preexec_fn=in_child, **popen_kwargs)


def watch_parent(parent: int, interval_s: float = WATCH_INTERVAL_S, grace_s: float = KILL_GRACE_S) -> threading.Thread:
    """In the child: a daemon thread that ends this process once its parent pid is no longer
    `parent` (the parent died and the child was reparented): SIGTERM first (the server's own
    shutdown), SIGKILL if that has not ended it within grace_s."""

    def run() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        finally:
            time.sleep(grace_s)
            os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=run, daemon=True, name="picospec-parent-watch")
    thread.start()
    return thread


def _child_main(argv: list[str]) -> None:
    """`python -m edge_app.embedded --parent PID MODULE ARGS...`: watch PID, then run MODULE as
    __main__ in this process (its argv is MODULE ARGS...)."""
    import runpy

    if len(argv) < 3 or argv[0] != "--parent":
        sys.exit("usage: python -m edge_app.embedded --parent PID MODULE [ARGS...]")
    parent, module, rest = int(argv[1]), argv[2], argv[3:]
    if os.getppid() != parent:  # already orphaned before it got here
        sys.exit(f"edge_app.embedded: parent {parent} is gone")
    set_parent_death_signal(DEATH_SIGNAL, expected_parent=parent)  # kept from the preexec; again for exec'd paths
    watch_parent(parent)
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


# -- the embedded verifier -------------------------------------------------------------------
class EmbeddedVerifier:
    """`python -m cloud.cli --port 0 ...` as a child process; `.url` once it is ready.

    `module` is the server module to run (cloud.cli; tests give a tiny-target one); it must print
    the ready line (`{"event": "ready", "port": ...}`) on stdout once it listens."""

    def __init__(self, target: str | None = None, dtype: str = "auto", threads: int | None = None,
                 cores: set[int] | None = None, token: str | None = None, extra_args: list[str] = (),
                 startup_timeout_s: float = 900.0, log_path: str | None = None, module: str = "cloud.cli"):
        self.module = module
        self.args = ["--host", "127.0.0.1", "--port", "0", "--dtype", dtype, "--log-level", "WARNING",
                     *extra_args]
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

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> "EmbeddedVerifier":
        env = dict(os.environ)
        if self.token:
            env["PICOSPEC_TOKEN"] = self.token
        self.proc = launch_tied(self.module, self.args, cores=self.cores, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
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


if __name__ == "__main__":
    _child_main(sys.argv[1:])
