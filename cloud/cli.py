"""`picospec serve`: the cloud verifier as a command (also `python -m cloud.cli`)."""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from cloud.drain import drain

DRAIN_TIMEOUT_S = 45.0  # must match deploy/k8s (terminationGracePeriodSeconds) and docs/DEPLOY.md


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (0 picks a free one; default 8765)")
    p.add_argument("--target", default=None, help="target model: a transformers directory or a GGUF "
                   "file (default: $PICOSPEC_TARGET, else Qwen2.5-Coder-1.5B-Instruct)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"],
                   help="target dtype (default auto: bfloat16 on CUDA or a CPU with native bf16, "
                        "else float32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--token", default=os.environ.get("PICOSPEC_TOKEN"),
                   help="shared secret edges must present (default $PICOSPEC_TOKEN; unset = open)")
    p.add_argument("--tokens-file", default=None,
                   help="more accepted tokens, one per line (one per edge fleet: limits count per token)")
    p.add_argument("--max-sessions", type=int, default=64)
    p.add_argument("--max-sessions-per-token", type=int, default=8,
                   help="concurrent sessions per token (per peer address on an open server); 0 = no limit")
    p.add_argument("--max-block", type=int, default=16, help="most drafted tokens verified in one pass")
    p.add_argument("--max-context", type=int, default=32768, help="most tokens (prompt + answer) per session")
    p.add_argument("--idle-timeout", type=float, default=300.0,
                   help="seconds before an idle session is evicted (its KV cache freed; the edge resumes)")
    p.add_argument("--hello-timeout", type=float, default=10.0, help="seconds a new connection has to say hello")
    p.add_argument("--max-msg-size", type=int, default=4 << 20, help="largest frame in bytes")
    p.add_argument("--max-msgs-per-s", type=float, default=400.0,
                   help="messages a second per connection, steady (0 = no limit)")
    p.add_argument("--msg-burst", type=float, default=800.0, help="messages per connection allowed at once")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve wss:// (with --tls-key)")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--no-batch", action="store_true",
                   help="one session's pass at a time (default: every ready session's work in one pass per tick)")
    p.add_argument("--batch-max-tokens", type=int, default=256, help="most ids fed in one batched pass (default 256)")
    p.add_argument("--rule", default="auto", choices=["auto", "numpy", "torch"],
                   help="where the accept / recover rule runs: torch on the target's device, numpy on "
                        "the host (default auto: torch on a GPU target, numpy on a CPU one)")
    p.add_argument("--prefix-cache-mb", type=float, default=256.0,
                   help="memory for the keys and values of prompt openings many conversations share "
                        "(the chat template's system turn), kept across sessions (default 256; 0 = off)")
    p.add_argument("--drain-timeout", type=float, default=DRAIN_TIMEOUT_S,
                   help="seconds a SIGTERM drain may take before open sessions are cut (default 45)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--log-json", action="store_true", help="logs as JSON lines (with session ids)")


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the cloud verifier (aiohttp, WebSocket /ws)")
    add_serve_arguments(p)
    p.set_defaults(func=run)


def build_server(args):
    """Load the target and wrap it in a VerifierServer (not started)."""
    from cloud.engine import EngineConfig, TargetEngine
    from cloud.server import VerifierServer
    from models.fingerprint import from_gguf, from_hf_dir
    from models.resolve import ensure_ready, resolve_target

    config = server_config(args)
    spec = resolve_target(args.target)
    path = ensure_ready(spec, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    spec = type(spec)(**{**spec.__dict__, "path": path})
    engine = TargetEngine.load(spec, EngineConfig(dtype=args.dtype, device=args.device, threads=args.threads))
    fingerprint = (from_gguf(path) if spec.kind == "gguf" else from_hf_dir(path)).to_dict()
    return VerifierServer(engine, fingerprint, spec.name, config)


def server_config(args):
    """ServerConfig from the serve flags (checks the TLS files load before the model does)."""
    from cloud.connection import server_ssl
    from cloud.server import ServerConfig

    server_ssl(args.tls_cert, args.tls_key)  # a wrong path or key fails now, with its reason
    return ServerConfig(
        host=args.host, port=args.port, token=args.token or None, tokens=read_tokens(args.tokens_file),
        max_sessions=args.max_sessions, max_sessions_per_token=args.max_sessions_per_token,
        max_block=args.max_block, max_context=args.max_context, idle_timeout_s=args.idle_timeout,
        hello_timeout_s=args.hello_timeout, max_msg_size=args.max_msg_size,
        msgs_per_s=args.max_msgs_per_s, msg_burst=args.msg_burst,
        tls_cert=args.tls_cert, tls_key=args.tls_key, batch=not args.no_batch,
        batch_max_tokens=args.batch_max_tokens, rule=args.rule,
        prefix_cache_bytes=int(args.prefix_cache_mb * (1 << 20)))


def read_tokens(path: str | None) -> tuple[str, ...]:
    if not path:
        return ()
    with open(path) as f:
        return tuple(line.strip() for line in f if line.strip() and not line.startswith("#"))


async def serve_forever(server) -> None:
    from cloud.server import ready_line

    port = await server.start()
    print(ready_line(port, server.model_name, server.scheme), flush=True)
    ws = "wss" if server.scheme == "https" else "ws"
    print(f"picospec verifier: {server.model_name} on {server.scheme}://{server.config.host}:{port} "
          f"({ws}:// /ws, /healthz, /metrics)", file=sys.stderr, flush=True)
    stop, drain_asked = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_sigterm() -> None:  # the first drains; a second ends the drain at once
        (stop if drain_asked.is_set() else drain_asked).set()

    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    await _wait_first(stop.wait(), drain_asked.wait())
    if drain_asked.is_set() and not stop.is_set():
        print("picospec verifier: draining (a second SIGTERM stops at once)", file=sys.stderr, flush=True)
        deadline = getattr(server, "drain_timeout_s", DRAIN_TIMEOUT_S)
        done = await _wait_first(drain(server, deadline), stop.wait(), timeout=deadline + 1.0)
        print(f"picospec verifier: drained {done}", file=sys.stderr, flush=True)
    await server.stop()


async def _wait_first(*aws, timeout: float | None = None):
    """Run awaitables until the first finishes (the rest are cancelled); its result, or None."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    finished, pending = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return next(iter(finished)).result() if finished else None


def run(args) -> int:
    from cloud.logs import setup_logging
    from models.errors import ModelError

    setup_logging(args.log_level, json_lines=args.log_json)
    try:
        server = build_server(args)
    except (ModelError, OSError, ValueError) as err:  # a missing model, TLS file or tokens file
        print(f"picospec serve: {err}", file=sys.stderr)
        return 2
    server.drain_timeout_s = args.drain_timeout
    asyncio.run(serve_forever(server))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="picospec serve")
    add_serve_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
