"""`picospec generate PROMPT`: one prompt in, verified text out (streamed), with its stats."""
from __future__ import annotations

import json
import sys

from edge_app.args import add_edge_arguments, add_sampling_arguments, edge_config_kwargs, generate_kwargs
from edge_app.textstream import TextStream


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate a completion of one prompt")
    p.add_argument("prompt", help="the prompt ('-' reads it from stdin)")
    p.add_argument("--raw", action="store_true", help="no chat template: the prompt is plain text to continue")
    p.add_argument("--system", default=None, help="a system turn before the prompt (chat template only)")
    p.add_argument("--n", type=int, default=1, help="independent completions")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_sampling_arguments(p)
    add_edge_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from edge_app.link import CloudError
    from models.errors import ModelError
    from picospec.api import PicoSpec

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    need_cloud = args.mode != "edge"
    try:
        ps = PicoSpec(**edge_config_kwargs(args), need_cloud=need_cloud)
    except (ModelError, CloudError, RuntimeError) as err:
        print(f"picospec generate: {err}", file=sys.stderr)
        return 2
    stream = None if args.json else _Streamer(ps)
    try:
        out = ps.generate(prompt, raw=args.raw, system=args.system, n=args.n,
                          on_commit=stream, **generate_kwargs(args))
    except CloudError as err:
        print(f"\npicospec generate: the verifier said {err}", file=sys.stderr)
        return 3
    finally:
        if stream is not None:
            stream.finish()
        ps.close()
    if args.json:
        print(json.dumps(out))
    else:
        s = out["stats"]
        label = "" if out["target_quality"] else "  [edge only: draft model, not target quality]"
        acc = f"{s['acceptance_rate']:.2f}" if s["acceptance_rate"] is not None else "-"
        print(f"\n\n[{out['mode']}] {s['new_tokens']} tokens in {s['wall_s']:.2f} s = "
              f"{s['tokens_per_s']:.2f} tok/s, acceptance {acc}, TTFT {s['ttft_s'] or 0:.2f} s, "
              f"{s['bytes_up']} B up / {s['bytes_down']} B down{label}", file=sys.stderr)
    return 0


class _Streamer:
    """Prints committed text to stdout as it grows."""

    def __init__(self, ps):
        self.stream = TextStream(ps.client.decode)

    def __call__(self, new_ids: list[int], speculative: list[int]) -> None:
        self._write(self.stream.feed(new_ids))

    def finish(self) -> None:
        self._write(self.stream.finish())

    @staticmethod
    def _write(text: str) -> None:
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
