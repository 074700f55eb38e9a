"""`picospec serve`: the cloud verifier as a command (also `python -m cloud.cli`)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (0 picks a free one; default 8765)")
    p.add_argument("--target", default=None, help="target model: a transformers directory or a GGUF "
                   "file (default: $PICOSPEC_TARGET, else Qwen2.5-Coder-1.5B-Instruct)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default auto)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                   help="target weights dtype (default bfloat16; float32 for bit-exact greedy tests)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--token", default=os.environ.get("PICOSPEC_TOKEN"),
                   help="shared secret edges must present (default $PICOSPEC_TOKEN; unset = open)")
    p.add_argument("--max-sessions", type=int, default=64)
    p.add_argument("--max-block", type=int, default=16, help="most drafted tokens verified in one pass")
    p.add_argument("--idle-timeout", type=float, default=300.0, help="seconds before an idle session is closed")
    p.add_argument("--log-level", default="INFO")


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the cloud verifier (aiohttp, WebSocket /ws)")
    add_serve_arguments(p)
    p.set_defaults(func=run)


def build_server(args):
    """Load the target and wrap it in a VerifierServer (not started)."""
    from cloud.engine import EngineConfig, TargetEngine
    from cloud.server import ServerConfig, VerifierServer
    from models.fingerprint import from_gguf, from_hf_dir
    from models.resolve import ensure_ready, resolve_target

    spec = resolve_target(args.target)
    path = ensure_ready(spec, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    spec = type(spec)(**{**spec.__dict__, "path": path})
    engine = TargetEngine.load(spec, EngineConfig(dtype=args.dtype, device=args.device, threads=args.threads))
    fingerprint = (from_gguf(path) if spec.kind == "gguf" else from_hf_dir(path)).to_dict()
    config = ServerConfig(host=args.host, port=args.port, token=args.token or None,
                          max_sessions=args.max_sessions, max_block=args.max_block,
                          idle_timeout_s=args.idle_timeout)
    return VerifierServer(engine, fingerprint, spec.name, config)


async def serve_forever(server) -> None:
    from cloud.server import ready_line

    port = await server.start()
    print(ready_line(port, server.model_name), flush=True)
    print(f"picospec verifier: {server.model_name} on http://{server.config.host}:{port} "
          f"(WebSocket /ws, /healthz, /metrics)", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def run(args) -> int:
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    from models.errors import ModelError

    try:
        server = build_server(args)
    except ModelError as err:
        print(f"picospec serve: {err}", file=sys.stderr)
        return 2
    asyncio.run(serve_forever(server))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="picospec serve")
    add_serve_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
