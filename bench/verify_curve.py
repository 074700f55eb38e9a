"""The verify-pass cost curve T(k): seconds for one forward pass of k tokens after a context, with
torch's stock linear layers and with the row-streaming kernel (cloud/kernels.py), in one process.

    python -m bench.verify_curve --threads 1 --context 200
    python -m bench.verify_curve --random-init          # Qwen2.5 1.5B geometry, random weights
    python -m bench.verify_curve --layers --clock cpu   # single linear layers only, no model

The two kernels are measured alternately, repeat by repeat, and each T(k) is the minimum over
repeats (the machine may be shared: the load average is printed beside the numbers). It also prints
the largest logit difference between the two kernels on one k-token pass, and whether greedy
continuations agree. Timings do not depend on the weights' values, so `--random-init` measures the
default target's geometry where the model is not installed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from cloud.engine import TargetEngine, measure_verify_curve
from cloud.kernels import accelerate_linears, restore_linears

# Qwen2.5-Coder-1.5B as the default target's GGUF converts it (used when no config is at hand)
QWEN25_15B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                  rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False)


def default_target_config():
    """The default target's transformers config: its cached copy's when one exists, else Qwen2.5
    1.5B's geometry."""
    from transformers import AutoConfig, Qwen2Config

    try:
        from models.resolve import resolve_target
        from models.target_cache import STORE_DTYPE, cached_copy_dir, is_complete, source_sha256

        spec = resolve_target(None)
        if spec.sha256:
            copy = cached_copy_dir(source_sha256(spec), STORE_DTYPE)
            if is_complete(copy):
                return AutoConfig.from_pretrained(str(copy))
    except Exception:
        pass
    return Qwen2Config(**QWEN25_15B)


def random_target(seed: int = 0, layers: int | None = None, device: str = "cpu",
                  dtype: torch.dtype = torch.float32, config=None, fast_linear: bool | None = False):
    """A randomly initialised model of a geometry (`config`: a transformers config or a Qwen2
    config's keyword dict; default the default target's), float32 on the CPU by default, built
    directly on `device` (a 7B model never sits in host memory first). layers: keep only the
    first N decoder layers (a shallower model of the same width and vocabulary). fast_linear: as
    TargetEngine.from_model (False here: stock linears; None: the server's CPU kernel)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    if config is None:
        config = default_target_config()
    elif isinstance(config, dict):
        config = Qwen2Config(**config)
    if layers:
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:layers]
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    return TargetEngine.from_model(model.to(device), None, device, fast_linear=fast_linear)


def real_target() -> TargetEngine:
    from cloud.engine import EngineConfig
    from models.resolve import ensure_ready, resolve_target

    spec = resolve_target(None)
    spec = type(spec)(**{**spec.__dict__, "path": ensure_ready(spec)})
    # stock here; the fast path is switched on and off per measurement
    return TargetEngine.load(spec, EngineConfig(dtype="float32", device="cpu", fast_linear=False))


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def use_kernel(engine: TargetEngine, kernel: str) -> str:
    restore_linears(engine.model)
    if kernel == "stock":
        return "stock torch linears"
    return accelerate_linears(engine.model, enabled=True)


# The target's linear layers that carry its weight stream: MLP up/gate, MLP down, the lm_head
LAYERS = {"up 8960x1536": (8960, 1536), "down 1536x8960": (1536, 8960), "lm_head 151936x1536": (151936, 1536)}


@torch.inference_mode()
def layer_curves(ks: list[int], repeats: int, clock, kernels: list[str]) -> dict:
    """Milliseconds per product of k rows with each of LAYERS' weights: {layer: {kernel: {k: ms}}},
    the minimum over `repeats` rounds in which the kernels alternate. The MLP layers cycle through
    6 weight copies (330 MB), so every product streams its weights from memory as in the model."""
    import torch.nn.functional as F

    from cloud.kernels import load_kernel, pack, packed_linear

    ok, why = load_kernel()
    if not ok:
        raise SystemExit(f"fast kernel unavailable: {why}")
    run = {"stock": F.linear, "fast": packed_linear}
    layout = {"stock": lambda w: w, "fast": pack}  # the kernel reads its own layout, packed once
    g = torch.Generator().manual_seed(0)
    out: dict = {}
    for name, (n, kk) in LAYERS.items():
        copies = 1 if n * kk > 1e8 else 6
        plain = [torch.randn(n, kk, generator=g) for _ in range(copies)]
        weights = {kernel: [layout[kernel](w) for w in plain] for kernel in kernels}
        del plain
        calls = max(3, int(2e9 / (n * kk * 4)) // copies * copies // 2)  # ~0.5 s of streaming
        best = {kernel: {k: float("inf") for k in ks} for kernel in kernels}
        for k in ks:
            x = torch.randn(k, kk, generator=g)
            for _ in range(repeats):
                for kernel in kernels:
                    t0 = clock()
                    for c in range(calls):
                        run[kernel](x, weights[kernel][c % copies])
                    best[kernel][k] = min(best[kernel][k], (clock() - t0) / calls * 1e3)
        out[name] = best
        print(f"\n{name}: ms per product ({calls} products a round, min over {repeats} rounds)")
        print(f"{'k':>4} " + " ".join(f"{kernel:>10}" for kernel in kernels))
        for k in ks:
            print(f"{k:>4} " + " ".join(f"{best[kernel][k]:10.3f}" for kernel in kernels))
        if 1 in ks and 8 in ks:
            print("  T(8)/T(1): " + ", ".join(f"{kernel} {best[kernel][8] / best[kernel][1]:.2f}" for kernel in kernels),
                  flush=True)
    return out


@torch.inference_mode()
def compare_logits(engine: TargetEngine, context: int, k: int, greedy: int, seed: int = 1) -> dict:
    """Stock vs fast on the same k-token pass after the same context (each kernel end to end):
    the largest absolute logit difference, and whether greedy continuations agree."""
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randint(0, engine.vocab_size, (context,), generator=g).tolist()
    block = torch.randint(0, engine.vocab_size, (k,), generator=g).tolist()
    rows, outs = {}, {}
    for kernel in ("stock", "fast"):
        use_kernel(engine, kernel)
        probe = engine.fork()
        probe.prefill(ctx)
        rows[kernel] = probe.forward(block).clone()
        out, logits = [], rows[kernel][-1]
        for _ in range(greedy):
            out.append(int(torch.argmax(logits)))
            logits = probe.forward(out[-1:])[-1]
        outs[kernel] = out
    diff = (rows["stock"] - rows["fast"]).abs().max().item()
    return {"k": k, "max_abs_logit_diff": diff, "logit_scale": rows["stock"].abs().max().item(),
            "greedy_tokens": greedy, "greedy_equal": outs["stock"] == outs["fast"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.verify_curve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--ks", default="1,2,4,8,16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--random-init", action="store_true", help="random weights, default target geometry")
    ap.add_argument("--kernels", default="stock,fast")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: the calling thread's CPU time (steadier on a shared machine; one thread only)")
    ap.add_argument("--greedy", type=int, default=8, help="greedy tokens compared (0: skip the check)")
    ap.add_argument("--json", default="bench/results/verify_curve.json")
    ap.add_argument("--layers", action="store_true",
                    help="time single linear layers (MLP up, down, lm_head shapes) instead of the model")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    kernels = args.kernels.split(",")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    if args.layers:
        print(f"single layers, {args.threads} thread(s), {args.clock} clock, load average {load_average()}")
        layer_curves(ks, args.repeats, clock, kernels)
        return 0

    t0 = time.perf_counter()
    engine = random_target() if args.random_init else real_target()
    print(f"target loaded in {time.perf_counter() - t0:.1f} s ({'random init' if args.random_init else 'real weights'}), "
          f"{args.threads} thread(s), context {args.context}, {args.clock} clock, load average {load_average()}", flush=True)

    described, curves = {}, {kernel: {k: float("inf") for k in ks} for kernel in kernels}
    loads = [load_average()]
    for r in range(args.repeats):  # alternate the kernels so both see the same machine
        for kernel in kernels:
            described[kernel] = use_kernel(engine, kernel)
            curve = measure_verify_curve(engine, ks, context=args.context, repeats=1, seed=r, clock=clock)
            curves[kernel] = {k: min(curves[kernel][k], curve[k]) for k in ks}
        loads.append(load_average())
        print(f"  repeat {r + 1}/{args.repeats}: " + "; ".join(
            f"{kernel} " + " ".join(f"{curve_ms:.0f}" for curve_ms in (curves[kernel][k] * 1e3 for k in ks))
            for kernel in kernels) + f" ms (load {loads[-1]})", flush=True)

    print(f"\nT(k) in ms ({args.clock} clock), min over {args.repeats} repeats; load average before/after: {loads[0]} / {loads[-1]}")
    print(f"{'k':>4} " + " ".join(f"{kernel:>10}" for kernel in kernels))
    for k in ks:
        print(f"{k:>4} " + " ".join(f"{curves[kernel][k] * 1e3:10.1f}" for kernel in kernels))
    ratios = {}
    for kernel in kernels:
        if 1 in ks and 8 in ks:
            ratios[kernel] = curves[kernel][8] / curves[kernel][1]
            print(f"{kernel}: T(8)/T(1) = {ratios[kernel]:.2f}   ({described[kernel]})")
    check = None
    if args.greedy and set(kernels) == {"stock", "fast"}:
        check = compare_logits(engine, args.context, 8, args.greedy)
        print(f"stock vs fast, 8-token pass: max |logit diff| {check['max_abs_logit_diff']:.2e} "
              f"(logits up to {check['logit_scale']:.1f}); greedy {args.greedy} tokens equal: {check['greedy_equal']}")

    result = {"threads": args.threads, "context": args.context, "repeats": args.repeats, "clock": args.clock,
              "random_init": args.random_init, "load_average": loads, "kernels": described,
              "T_s": {kernel: {str(k): v for k, v in curve.items()} for kernel, curve in curves.items()},
              "ratio_8_1": ratios, "check": check, "torch": torch.__version__}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
