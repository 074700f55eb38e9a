"""Runs the benchmark: one local verifier and one drafter, started once, an emulated link between them.

    edge (this process, edge cores) --ws--> ThreadedLinkProxy (rtt/2 each way) --> verifier (cloud cores)

Each (mode, rtt) runs every prompt (greedy, or sampled with the run's parameters) through
`EdgeClient.generate_ids` and leaves one record per prompt (see bench/report.py); at each RTT the
modes take turns prompt by prompt, every answer on a fresh session. Edge-only does not use the
link: it runs once. Hugging Face assisted generation runs last, in its own process on the cloud
cores, after the verifier has stopped so that nothing else competes for those cores.
"""
from __future__ import annotations

import asyncio
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Callable
from urllib.parse import urlsplit

from bench.linkproxy import LinkConfig, ThreadedLinkProxy
from bench.prompt_sets import BenchPrompt
from bench.report import tpot_samples

LINK_MODES = ("cloud", "sync", "pipeline", "auto", "branch", "uncut")
ALL_MODES = ("edge", "cloud", "sync", "pipeline", "auto", "branch", "uncut", "hf-assisted")
# "branch": the pipeline with branch pre-drafting (edge_app/branches.py), to measure what it gains;
# "uncut": the pipeline with full blocks only (no early send after an unsure token: cut_below 0)
WARMUP_TOKENS = 8
WARMUP_PROMPT = "Say hello in one short sentence."
REPLY_TIMEOUT_S = 900.0

Progress = Callable[[str, bool], None]  # (label, True) once per answer; (message, False) for notes


@dataclass
class BenchConfig:
    prompts: list[BenchPrompt]
    modes: list[str]
    rtts_ms: list[float]
    max_new_tokens: int = 64
    block: int | None = None
    up_kbps: float | None = None
    down_kbps: float | None = None
    jitter_ms: float = 0.0
    loss: float = 0.0
    draft: str | None = None
    target: str | None = None
    token: str | None = None
    dtype: str = "auto"
    threads: int | None = None
    pin: bool = True
    cloud: str | None = None  # a remote verifier's URL; None = start one on this machine
    # the local verifier keeps the chat openings (template header, system turn) every prompt
    # shares, as a fleet's verifier does; False: every answer prefills its whole prompt
    shared_openings: bool = True
    params: object = None  # sampling.SamplingParams of every answer; None: greedy
    figures: object = None  # edge_app.energy.PowerFigures or None
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="picospec-bench-")))


@dataclass
class BenchResult:
    records: list[dict] = field(default_factory=list)
    run_info: dict = field(default_factory=dict)  # (mode, rtt_ms or None) -> measured extras
    setup: dict = field(default_factory=dict)
    errors: list[dict] = field(default_factory=list)


def link_config(cfg: BenchConfig, rtt_ms: float) -> LinkConfig:
    """The emulated link for one RTT: half of it each way, plus the user's bandwidth/jitter/loss."""
    return LinkConfig(delay_ms=rtt_ms / 2, jitter_ms=cfg.jitter_ms, up_kbps=cfg.up_kbps,
                      down_kbps=cfg.down_kbps, loss=cfg.loss, seed=0)


def cores_line(split: tuple[set[int], set[int]] | None, pin: bool) -> str:
    if not pin:
        return "edge and cloud share every core (--no-pin)"
    if split is None:
        return f"this machine could not split its cores ({os.cpu_count()} visible): edge and cloud share them"
    return f"edge and cloud on separate cores: edge cores {sorted(split[0])}, cloud cores {sorted(split[1])}"


def remote_hostport(url: str) -> tuple[str, int]:
    """(host, port) of a ws://host:port[/ws] URL, for the proxy to dial."""
    parsed = urlsplit(url if "://" in url else f"ws://{url}")
    if parsed.scheme not in ("ws", "http") or not parsed.hostname:
        raise ValueError(f"--cloud must be ws://host:port (TLS is not proxied by the benchmark), got {url!r}")
    return parsed.hostname, parsed.port or 80


class CommitClock:
    """on_commit callback: when each group of committed tokens became visible."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.commits: list[tuple[float, int]] = []

    def __call__(self, new_ids: list[int], speculative: list[int]) -> None:
        self.commits.append((time.perf_counter() - self.t0, len(new_ids)))


def record_from(mode: str, rtt_ms: float | None, prompt: BenchPrompt, answer, clock: CommitClock) -> dict:
    """One prompt's record from a pipeline Answer (see bench/report.py for the fields)."""
    s = answer.stats
    edge = s.edge or {}
    return {"mode": mode, "rtt_ms": rtt_ms, "prompt": prompt.label, "token_ids": list(answer.token_ids),
            "new_tokens": s.new_tokens, "wall_s": s.wall_s, "ttft_s": s.ttft_s, "accepted": s.accepted,
            "rejected": s.rejected, "bonus": getattr(s, "bonus", 0), "rounds": s.rounds, "bytes_up": s.bytes_up, "bytes_down": s.bytes_down,
            "tpot_s": tpot_samples(clock.commits), "finish_reason": answer.finish_reason,
            "draft_s": edge.get("phases_s", {}).get("draft", 0.0),
            "draft_steps": edge.get("phase_counts", {}).get("draft", 0),
            "verify_s": list(s.verify_s), "block_sizes": list(s.block_sizes),
            "meters_tpot_ms": edge.get("tpot_ms"), "reconnects": getattr(s, "reconnects", 0),
            "edge_only_tokens": getattr(s, "edge_only_tokens", 0), "category": prompt.set_name,
            "filled": getattr(s, "filled", 0), "mode_switches": list(getattr(s, "mode_switches", [])),
            "branches": getattr(s, "branches", 0), "branch_hits": getattr(s, "branch_hits", 0),
            "cut_blocks": getattr(s, "cut_blocks", 0), "branches_taken": getattr(s, "branches_taken", 0)}


def hf_record(event: dict, prompt: BenchPrompt) -> dict:
    """One prompt's record from the hf-assisted subprocess (each commit = one verified round)."""
    commits = [tuple(c) for c in event["commits"]]
    return {"mode": "hf-assisted", "rtt_ms": None, "prompt": prompt.label, "token_ids": event["token_ids"],
            "new_tokens": event["tokens"], "wall_s": event["seconds"], "ttft_s": event["ttft_s"],
            "accepted": sum(max(0, n - 1) for _, n in commits), "rejected": 0, "rounds": len(commits),
            "bytes_up": 0, "bytes_down": 0, "tpot_s": tpot_samples(commits), "finish_reason": None,
            "draft_s": 0.0, "draft_steps": 0, "verify_s": [], "block_sizes": []}


# -- the link modes ------------------------------------------------------------------------------
async def run_link_modes(cfg: BenchConfig, result: BenchResult, progress: Progress) -> list[list[int]]:
    """Every mode except hf-assisted; returns the prompts' token ids (for hf-assisted)."""
    from edge_app.client import EdgeClient, EdgeConfig
    from edge_app.embedded import split_cores
    from edge_app.energy import pick_sensor
    from edge_app.probe import measure_verify_curve

    split = split_cores() if cfg.pin else None
    if split:
        os.sched_setaffinity(0, split[0])  # the verifier child re-pins itself to the cloud cores
    result.setup.update(cores=cores_line(split, cfg.pin), edge_cores=sorted(split[0]) if split else None,
                        cloud_cores=sorted(split[1]) if split else None)
    if cfg.cloud:
        result.setup["cores"] += f"; the verifier is remote ({cfg.cloud}): the emulated RTT adds to the real one"
    progress(result.setup["cores"], False)
    link_modes = [m for m in LINK_MODES if m in cfg.modes]
    verifier = proxy = client = None
    try:
        if link_modes:
            verifier, proxy = await _start_cloud_side(cfg, split, result, progress)
        path = (urlsplit(cfg.cloud).path or "/ws") if cfg.cloud and "://" in cfg.cloud else "/ws"
        url = proxy.url_for(path, "ws") if proxy else None
        # a benchmark must fail loudly rather than fill answers with draft-only tokens, and a slow
        # CPU verifier's prefill can take minutes: no edge-only fallback, a patient reply timeout
        client = EdgeClient(EdgeConfig(draft=cfg.draft, cloud=url, token=cfg.token, dtype=cfg.dtype,
                                       threads=cfg.threads, pin_cores=False, edge_fallback=False,
                                       reply_timeout_s=REPLY_TIMEOUT_S))
        await client.start(need_cloud=bool(link_modes))
        result.setup.update(draft=client.draft_name, draft_threads=client.drafter.config.resolved_threads(),
                            stop_ids=list(client.stop_ids))
        ids = [client.encode_prompt(p.text) for p in cfg.prompts]
        result.setup["prompt_tokens"] = {p.label: len(i) for p, i in zip(cfg.prompts, ids)}
        sensor = pick_sensor()
        await _warm_up(client, cfg, link_modes)
        if client.link is not None and client.link.welcome is not None:
            result.setup["target"] = client.link.welcome.model
            progress("measuring the verifier's T(k) curve", False)
            # the probe's drafts carry no distributions: a greedy session, whatever the run samples
            link = client.link
            if cfg.params is not None:
                link = await client.open_session(_options(cfg, "sync", 1, greedy=True))
            curve = await measure_verify_curve(link, link.welcome.vocab_size)
            result.setup["verify_curve_s"] = {str(k): v for k, v in curve.items()}
        if "edge" in cfg.modes:
            await _run_modes(client, cfg, ["edge"], None, ids, result, sensor, None, progress)
        for rtt in cfg.rtts_ms if link_modes else []:
            proxy.update(link_config(cfg, rtt))
            await _reset_link(client)
            result.run_info[("link", rtt)] = {"measured_rtt_s": await measure_rtt(proxy.url_for("/healthz"))}
            await _run_modes(client, cfg, link_modes, rtt, ids, result, sensor, proxy, progress)
        return ids
    finally:
        if client is not None:
            await client.close()
        if proxy is not None:
            proxy.close()
        if verifier is not None:
            verifier.stop()


async def _start_cloud_side(cfg: BenchConfig, split, result: BenchResult, progress: Progress):
    """(verifier or None, proxy): a local verifier on the cloud cores, or the remote one, behind the proxy."""
    if cfg.cloud:
        proxy = ThreadedLinkProxy(*remote_hostport(cfg.cloud), link_config(cfg, cfg.rtts_ms[0]))
        proxy.start()
        return None, proxy
    from edge_app.embedded import EmbeddedVerifier

    progress("starting the local verifier (loading the target)", False)
    t0 = time.perf_counter()
    verifier = EmbeddedVerifier(cfg.target, cfg.dtype, len(split[1]) if split else None,
                                split[1] if split else None, cfg.token, log_path=str(cfg.workdir / "verifier.log"),
                                extra_args=[] if cfg.shared_openings else ["--prefix-cache-mb", "0"])
    result.setup["shared_openings"] = cfg.shared_openings
    await asyncio.get_running_loop().run_in_executor(None, verifier.start)
    result.setup["verifier_start_s"] = time.perf_counter() - t0
    proxy = ThreadedLinkProxy("127.0.0.1", verifier.port, link_config(cfg, cfg.rtts_ms[0]))
    proxy.start()
    return verifier, proxy


def _options(cfg: BenchConfig, mode: str, max_new: int, greedy: bool = False):
    from edge_app.pipeline import GenerateOptions
    from sampling import SamplingParams

    # every answer of a sampled run draws with the same parameters and seed
    params = SamplingParams() if greedy or cfg.params is None else cfg.params
    if mode == "branch":
        return GenerateOptions(max_new_tokens=max_new, params=params, mode="pipeline", block=cfg.block,
                               branch=True)
    if mode == "uncut":
        return GenerateOptions(max_new_tokens=max_new, params=params, mode="pipeline", block=cfg.block,
                               cut_below=0.0)
    return GenerateOptions(max_new_tokens=max_new, params=params, mode=mode, block=cfg.block)


async def _warm_up(client, cfg: BenchConfig, link_modes: list[str]) -> None:
    """One short generation so that first-call costs (allocations, the session) are not timed. Its
    prompt is none of the benchmark's, so that no timed answer finds its prompt already cached."""
    mode = "pipeline" if "pipeline" in link_modes else (link_modes[0] if link_modes else "edge")
    await client.generate_ids(client.encode_prompt(WARMUP_PROMPT), _options(cfg, mode, WARMUP_TOKENS))


async def measure_rtt(url: str, n: int = 5) -> float | None:
    """Median time of an HTTP GET through the proxy on a kept-alive connection: the link's real round
    trip (configured delay + proxy + stack + a trivial handler), measured while the verifier idles."""
    import aiohttp

    times = []
    try:
        async with aiohttp.ClientSession() as http:
            for i in range(n + 1):
                t0 = time.perf_counter()
                async with http.get(url) as resp:
                    await resp.read()
                if i:  # the first one also opened the connection
                    times.append(time.perf_counter() - t0)
    except (aiohttp.ClientError, OSError):
        return None
    return median(times)


async def _fresh_state(client) -> None:
    """Every answer starts cold on both sides: a new verifier session (empty KV cache; only the
    chat opening every prompt shares comes from the verifier's store, unless shared_openings is
    off) and an empty draft cache, whatever mode ran before it."""
    await _reset_link(client)
    client.drafter.reset()


def mode_order(modes: list[str], index: int) -> list[str]:
    """The modes in the order prompt `index` runs them: rotated by one per prompt, so that no mode
    always follows the same one (or always runs first after the link changes)."""
    if not modes:
        return []
    k = index % len(modes)
    return modes[k:] + modes[:k]


@dataclass
class RunTotals:
    """What one (mode, rtt) run measured over its answers: energy reports and wire bytes, summed,
    and the client's estimates right after the mode's latest answer."""

    energy: list[dict] = field(default_factory=list)
    wire_up: int = 0
    wire_down: int = 0
    estimates: dict = field(default_factory=dict)


def sum_energy(reports: list[dict]) -> dict:
    """One energy report for a run from its answers' reports (edge_app.energy.EnergyMeter.stop):
    joules and wall_s summed, joules None if any answer's were not measured; source and scope from
    the first (one meter setup per run), and an estimate's formula without one answer's numbers."""
    if not reports:
        return {"joules": None, "source": "not measured", "formula": None, "scope": None, "wall_s": 0.0,
                "detail": None}
    joules = [r.get("joules") for r in reports]
    out = dict(reports[0])
    out["joules"] = None if any(j is None for j in joules) else sum(joules)
    out["wall_s"] = sum(r.get("wall_s") or 0.0 for r in reports)
    if len(reports) > 1 and out.get("formula"):
        out["formula"] = f"{out['formula'].split(' = ')[0]}, summed over {len(reports)} answers"
    return out


async def _run_modes(client, cfg: BenchConfig, modes: list[str], rtt: float | None, ids: list[list[int]],
                     result: BenchResult, sensor, proxy, progress: Progress) -> None:
    """Every prompt in every mode at one RTT, interleaved: prompt by prompt, each mode in turn (see
    mode_order), each answer on a fresh session and draft cache. A machine whose speed drifts
    during the benchmark then slows every mode alike, where one mode's whole run after another's
    would carry the drift into their ratio. Energy and wire bytes are measured per answer and
    summed per mode."""
    totals = {mode: RunTotals() for mode in modes}
    for i, (prompt, prompt_ids) in enumerate(zip(cfg.prompts, ids)):
        for mode in mode_order(modes, i):
            await _run_answer(client, cfg, mode, rtt, prompt, prompt_ids, result, sensor, proxy, totals[mode])
            progress(f"{mode}@{rtt:g}ms" if rtt is not None else mode, True)
    for mode, t in totals.items():
        result.run_info[(mode, rtt)] = {"energy": sum_energy(t.energy), **t.estimates}
        if proxy is not None:
            result.run_info[(mode, rtt)].update(wire_bytes_up=t.wire_up, wire_bytes_down=t.wire_down)


async def _run_answer(client, cfg: BenchConfig, mode: str, rtt: float | None, prompt: BenchPrompt,
                      prompt_ids: list[int], result: BenchResult, sensor, proxy, totals: RunTotals) -> None:
    """One prompt in one mode: its record (or error), its energy and wire bytes added to `totals`."""
    from edge_app.energy import EnergyMeter
    from edge_app.link import CloudError

    timeout = REPLY_TIMEOUT_S + 5.0 * cfg.max_new_tokens  # a hung pipeline must not hang the benchmark
    await _fresh_state(client)
    meter = EnergyMeter(sensor, auto_detect=False, figures=cfg.figures)
    wire0 = (proxy.bytes_up, proxy.bytes_down) if proxy else None
    meter.start()
    clock = CommitClock()
    try:
        answer = await asyncio.wait_for(
            client.generate_ids(prompt_ids, _options(cfg, mode, cfg.max_new_tokens), clock), timeout)
        result.records.append(record_from(mode, rtt, prompt, answer, clock))
    except (CloudError, asyncio.TimeoutError, RuntimeError, ValueError) as err:
        result.errors.append({"mode": mode, "rtt_ms": rtt, "prompt": prompt.label,
                              "error": f"{type(err).__name__}: {err}"})
        await _reset_link(client)
    totals.energy.append(meter.stop())
    if wire0:
        totals.wire_up += proxy.bytes_up - wire0[0]
        totals.wire_down += proxy.bytes_down - wire0[1]
    # the estimates as this mode left them (the client shares them with the modes that run next)
    totals.estimates = _estimates(client, result, mode, rtt)


def _estimates(client, result: BenchResult, mode: str, rtt: float | None) -> dict:
    """The client's estimates now, for run_info (t_verify at the mode's mean block so far)."""
    est = client.estimates
    return {"client_t_rtt_est_s": est.t_rtt,
            "t_verify_est_s": est.verify(max(1, round(_mean_block(result, mode, rtt)))) if est.verify else None,
            "verify_curve_s": dict(sorted(est.verify.points.items())),
            "acceptance_est": est.acceptance, "t_draft_est_s": est.t_draft, "t_cloud_est_s": est.t_cloud}


def _mean_block(result: BenchResult, mode: str, rtt: float | None) -> float:
    sizes = [b for r in result.records if r["mode"] == mode and r["rtt_ms"] == rtt for b in r["block_sizes"]]
    return sum(sizes) / len(sizes) if sizes else 1.0


async def _reset_link(client) -> None:
    """After a failure the session may hold stale messages: drop it, the next answer reconnects."""
    if client.link is not None:
        try:
            await client.link.close()
        except Exception:  # already broken; we only want it gone
            pass
        client.link = None


# -- hf-assisted ---------------------------------------------------------------------------------
def run_hf_assisted(cfg: BenchConfig, ids: list[list[int]], stop_ids: list[int], result: BenchResult,
                    progress: Progress) -> None:
    """Assisted generation on the cloud cores (no network), one record per prompt."""
    from bench.hf_assisted import HfAssistedError, run_subprocess
    from edge_app.embedded import split_cores

    split = split_cores() if cfg.pin else None
    cores = split[1] if split else None
    job = {"target": cfg.target, "draft": cfg.draft, "dtype": cfg.dtype, "threads": len(cores) if cores else None,
           "max_new_tokens": cfg.max_new_tokens, "eos": stop_ids, "assistant_tokens": cfg.block, "prompts": ids}
    progress("hf-assisted: loading target and draft on the cloud cores", False)
    try:
        for event in run_subprocess(job, cfg.workdir / "hf_job.json", cores, cfg.workdir / "hf_assisted.log"):
            if event.get("event") == "ready":
                result.setup["hf_assisted"] = {k: v for k, v in event.items() if k != "event"}
                progress(f"hf-assisted ready (loaded in {event['load_s']:.0f} s)", False)
            elif event.get("event") == "answer":
                result.records.append(hf_record(event, cfg.prompts[event["index"]]))
                progress("hf-assisted", True)
    except (HfAssistedError, OSError) as err:
        result.errors.append({"mode": "hf-assisted", "rtt_ms": None, "prompt": None, "error": str(err)})
    result.run_info[("hf-assisted", None)] = {
        "energy": {"joules": None, "source": "not measured (co-located run on the cloud cores)"}}


def run_benchmark(cfg: BenchConfig, progress: Progress) -> BenchResult:
    """The whole benchmark: link modes (and edge), then hf-assisted."""
    result = BenchResult()
    ids = asyncio.run(run_link_modes(cfg, result, progress))
    if "hf-assisted" in cfg.modes:
        run_hf_assisted(cfg, ids, result.setup["stop_ids"], result, progress)
    return result
