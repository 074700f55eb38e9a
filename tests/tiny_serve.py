"""A tiny-target verifier as a process: `python -m tests.tiny_serve --port 0` is `picospec serve`
with the tiny test model (tests.tiny) instead of a real target. Same server, same ready line, same
signal handling (cloud.cli.serve_forever); the serve flags it has no use for (--dtype, --target,
--threads, ...) are accepted and ignored, so it can stand in for `picospec serve` anywhere (an
EmbeddedVerifier's child, a replica behind HAProxy)."""
from __future__ import annotations

import argparse
import asyncio
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tests.tiny_serve")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--max-sessions-per-token", type=int, default=64)
    p.add_argument("--log-level", default="WARNING")
    p.add_argument("--seed", type=int, default=0, help="the tiny target's seed (tests.tiny.tiny_model)")
    p.add_argument("--delay-ms", type=float, default=0.0, help="each forward pass takes at least this long")
    p.add_argument("--drain-timeout", type=float, default=45.0)
    args, _ = p.parse_known_args(argv)

    import torch

    torch.set_num_threads(1)
    from cloud.cli import serve_forever
    from cloud.engine import TargetEngine
    from cloud.logs import setup_logging
    from cloud.server import ServerConfig, VerifierServer
    from tests.tiny import SlowEngine, fingerprint, tiny_model

    setup_logging(args.log_level)
    config = ServerConfig(host=args.host, port=args.port, max_sessions_per_token=args.max_sessions_per_token)
    engine = TargetEngine(tiny_model(args.seed))
    if args.delay_ms:
        engine = SlowEngine(engine.model)
        engine.delay_s = args.delay_ms / 1e3
    server = VerifierServer(engine, fingerprint(), "tiny-qwen2", config)
    server.drain_timeout_s = args.drain_timeout
    asyncio.run(serve_forever(server))
    return 0


if __name__ == "__main__":
    sys.exit(main())
