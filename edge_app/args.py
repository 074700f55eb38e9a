"""Command-line flags shared by the commands that run the edge (generate, chat, demo, edge-serve,
bench), and the keyword arguments they turn into."""
from __future__ import annotations

import argparse
import os


class CloudUrls(argparse.Action):
    """--cloud URL[,URL...], repeatable: the URLs joined by commas, in order (EdgeConfig.cloud)."""

    def __call__(self, parser, namespace, values, option_string=None):
        urls = [u.strip() for u in str(values).split(",")]
        for url in urls:
            if "://" not in url or not url.split("://", 1)[1]:
                parser.error(f"{option_string}: {url!r} is not a verifier URL (ws://host:port or wss://host:port)")
        before = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, ",".join([*([before] if before else []), *urls]))


def add_edge_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models and cloud")
    g.add_argument("--draft", default=None, help="draft GGUF (default $PICOSPEC_DRAFT, else Qwen2.5-Coder-0.5B-Instruct)")
    g.add_argument("--cloud", default=None, action=CloudUrls, metavar="URL[,URL...]",
                   help="verifier URL, e.g. ws://host:8765; several (comma-separated, or the flag "
                        "repeated) are tried in turn on connect and reconnect (default: start one locally)")
    g.add_argument("--target", default=None, help="target for the local verifier (default $PICOSPEC_TARGET, else Qwen2.5-Coder-1.5B-Instruct)")
    g.add_argument("--token", default=None, help="shared secret for the verifier (default $PICOSPEC_TOKEN)")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="local verifier dtype (default auto: bf16 where the hardware has it, else fp32)")
    g.add_argument("--threads", type=int, default=None, help="draft threads (default: the edge's cores)")
    g.add_argument("--no-pin", action="store_true", help="don't split cores between edge and local verifier")
    g.add_argument("--ca-cert", default=None, help="PEM CA certificate to trust for a wss:// verifier "
                   "(e.g. its self-signed certificate)")
    f = p.add_argument_group("faults")
    f.add_argument("--reply-timeout", type=float, default=180.0,
                   help="seconds of verifier silence before the link counts as lost (default 180)")
    f.add_argument("--reconnect-s", type=float, default=8.0,
                   help="seconds to keep reconnecting to a lost verifier before going edge-only (default 8)")
    f.add_argument("--no-edge-fallback", action="store_true",
                   help="fail instead of continuing with the draft alone while the verifier is away")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--mode", default="auto", choices=["auto", "pipeline", "sync", "cloud", "edge"],
                   help="auto (default: cloud, sync or pipeline, whichever the measured numbers favour, re-planned "
                        "during the answer), pipeline (drafts ahead while blocks are verified), sync (vanilla "
                        "speculative), cloud (target only), edge (draft only: not target quality)")
    g.add_argument("--variant", default="exact", choices=["exact", "paper"],
                   help="exact: sparse q up, cloud recovers (default); paper: scalar q up, top-K p down (approximate)")
    g.add_argument("--paper-top-k", type=int, default=8)
    g.add_argument("--block", type=int, default=None, help="fixed drafted tokens per block (default: adaptive)")
    g.add_argument("--run-ahead", type=int, default=None, help="most unverified drafted tokens (default: 2 x block)")
    g.add_argument("--branch", action="store_true",
                   help="while waiting on a verdict, pre-draft after the likeliest rejection (off by default)")
    g.add_argument("--cut-below", type=float, default=0.5, metavar="P",
                   help="pipeline: send a block early after a drafted token the draft model gives less than this "
                        "probability, where a rejection is likely (default 0.5; 0 turns it off)")


def edge_config_kwargs(args: argparse.Namespace) -> dict:
    """EdgeConfig(...) (and PicoSpec(...)) keyword arguments from the edge flags."""
    return dict(draft=args.draft, cloud=args.cloud, target=args.target,
                token=args.token or os.environ.get("PICOSPEC_TOKEN"), dtype=args.dtype,
                threads=args.threads, pin_cores=not args.no_pin, ca_cert=args.ca_cert,
                reply_timeout_s=args.reply_timeout, reconnect_s=args.reconnect_s,
                edge_fallback=not args.no_edge_fallback)


def generate_kwargs(args: argparse.Namespace) -> dict:
    """The sampling flags as keyword arguments of PicoSpec.generate(...)."""
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, seed=args.seed, mode=args.mode, variant=args.variant,
                paper_top_k=args.paper_top_k, block=args.block, run_ahead=args.run_ahead,
                cut_below=args.cut_below)


def generate_options(args: argparse.Namespace):
    """The sampling flags as the pipeline's GenerateOptions (raises ValueError on bad numbers)."""
    from edge_app.pipeline import GenerateOptions
    from sampling import SamplingParams

    params = SamplingParams(args.temperature, args.top_p, args.top_k, args.seed).validate()
    return GenerateOptions(max_new_tokens=args.max_new_tokens, params=params, mode=args.mode,
                           variant=args.variant, paper_top_k=args.paper_top_k, block=args.block,
                           run_ahead=args.run_ahead, branch=getattr(args, "branch", False),
                           cut_below=args.cut_below)
