"""`picospec doctor`: what this edge device is, what it can measure, and how to run the draft here.

Every probe is cheap and read-only (no model is loaded, nothing is downloaded or joined) and a
probe that fails reports why instead of stopping the report.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import codec
from edge_app import energy

# Flags that matter to llama.cpp's CPU kernels, as /proc/cpuinfo spells them.
X86_FLAGS = ("avx", "avx2", "fma", "f16c", "avx_vnni")
X86_FLAG_PREFIXES = ("avx512", "amx")
ARM_FLAGS = {"asimd": "neon", "neon": "neon", "asimddp": "dotprod", "asimdhp": "fp16",
             "i8mm": "i8mm", "sve": "sve", "sve2": "sve2", "bf16": "bf16"}
ARM_PARTS = {"0xd03": "Cortex-A53", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
             "0xd08": "Cortex-A72", "0xd0b": "Cortex-A76", "0xd42": "Cortex-A78AE",
             "0x004": "NVIDIA Carmel"}
JETPACK_BY_L4T = {"32": "4", "34": "5", "35": "5", "36": "6", "38": "7"}

# Used only when the user has not measured them; each is named with its origin in the report.
ASSUMED = {
    "rtt_ms": (100.0, "assumed; pass --rtt-ms (e.g. from ping to the cloud host)"),
    "draft_ms_1t": (74.0, "Qwen2.5-Coder-0.5B Q4_K_M, 1 llama.cpp thread, measured on an x86 AVX2 "
                          "development VM; not this device: measure with picospec bench"),
    "draft_ms_2t": (40.0, "Qwen2.5-Coder-0.5B Q4_K_M, 2 llama.cpp threads (25 tok/s), measured on an "
                          "x86 AVX2 development VM; not this device: measure with picospec bench"),
    "verify_ms": (360.0, "Qwen2.5-Coder-1.5B bf16 verify pass on 1 CPU thread, measured on the "
                         "development VM; a GPU cloud is much faster: pass --verify-ms"),
    "acceptance": (0.77, "mean greedy agreement of the default pair on six chat prompts, measured "
                         "with the real-model tests"),
}


# 1. CPU, memory, OS -------------------------------------------------------------------------------
def parse_cpuinfo(text: str) -> dict:
    """Model, llama.cpp-relevant features and core counts from /proc/cpuinfo (x86 or ARM)."""
    fields: dict[str, str] = {}
    logical, cores = 0, set()
    physical_id = "0"
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        fields.setdefault(key, value)
        if key == "processor" and value.isdigit():
            logical += 1
        elif key == "physical id":
            physical_id = value
        elif key == "core id":
            cores.add((physical_id, value))
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    features = sorted({f for f in flags if f in X86_FLAGS or f.startswith(X86_FLAG_PREFIXES)}
                      | {ARM_FLAGS[f] for f in flags if f in ARM_FLAGS})
    model = fields.get("model name") or fields.get("model") or fields.get("hardware")
    part = ARM_PARTS.get(fields.get("cpu part", "").lower())
    if part and (not model or model.isdigit()):
        model = part
    return {"model": model, "arm_core": part, "features": features, "logical_cores": logical or None,
            "physical_cores": len(cores) or None}


def physical_cores_from_sysfs(root: Path) -> int | None:
    """Distinct sibling sets = physical cores, on any architecture."""
    sets = set()
    for cpu in (root / "sys/devices/system/cpu").glob("cpu[0-9]*/topology"):
        for name in ("core_cpus_list", "thread_siblings_list"):
            try:
                sets.add((cpu / name).read_text().strip())
                break
            except OSError:
                continue
    return len(sets) or None


def parse_meminfo(text: str) -> dict:
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key.strip()] = int(parts[0]) / 1024.0  # kB -> MiB
    return {"total_mib": values.get("MemTotal"), "available_mib": values.get("MemAvailable")}


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").replace("\x00", "").strip()
    except OSError:
        return None


X86_ONLY = {"sse2", "avx", "avx2", "fma", "f16c"}


def emulated(arch: str, cpu_flags: list[str] | set[str]) -> bool:
    """An ARM interpreter on an x86 host (qemu user mode): the kernel's cpuinfo is the host's."""
    return arch.lower() in ("aarch64", "arm64", "armv7l") and bool(X86_ONLY & set(cpu_flags))


def cpu_section(root: Path) -> dict:
    info = parse_cpuinfo(_read(root / "proc/cpuinfo") or "")
    info["logical_cores"] = info["logical_cores"] or os.cpu_count()
    info["physical_cores"] = info["physical_cores"] or physical_cores_from_sysfs(root)
    return info


def system_section(root: Path) -> dict:
    os_release = _read(root / "etc/os-release") or ""
    pretty = re.search(r'^PRETTY_NAME="?([^"\n]*)"?', os_release, re.M)
    return {"system": platform.system(), "release": platform.release(), "arch": platform.machine(),
            "distro": pretty.group(1) if pretty else None,
            "board": _read(root / "proc/device-tree/model"),
            "python": platform.python_version(), "python_executable": sys.executable}


# 2. llama.cpp ---------------------------------------------------------------------------------------
_LLAMA_PROBE = (
    "import json, llama_cpp as l\n"
    "info = l.llama_print_system_info()\n"
    "print(json.dumps({'version': l.__version__, 'system_info': info.decode() if isinstance(info, bytes) else str(info),"
    " 'gpu_offload': bool(l.llama_supports_gpu_offload())}))\n")


def parse_system_info(text: str) -> dict[str, str]:
    """`CPU : SSE3 = 1 | AVX2 = 1 | AMX_INT8 = 1 | ...` -> {"SSE3": "1", ...}."""
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"([A-Za-z0-9_]+)\s*=\s*([^|]+)", text)}


def llama_cpp_section(python: str = sys.executable) -> dict:
    """Ask a child interpreter: a llama.cpp built for another CPU can die (SIGILL) as soon as it
    is loaded, and that must not take the doctor down with it."""
    try:
        done = subprocess.run([python, "-c", _LLAMA_PROBE], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"installed": None, "error": str(exc)}
    if done.returncode < 0:
        return {"installed": True, "error": f"importing llama_cpp crashed (signal {-done.returncode}): "
                "the build probably targets another CPU; rebuild with GGML_NATIVE=OFF"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        missing = "No module named 'llama_cpp'" in last
        return {"installed": False if missing else None, "error": last}
    info = json.loads(done.stdout.strip().splitlines()[-1])
    flags = parse_system_info(info["system_info"])
    info["amx_compiled"] = any(k.startswith("AMX") and v == "1" for k, v in flags.items())
    info["installed"] = True
    if info["amx_compiled"]:
        info["warning"] = ("AMX kernels are compiled in: on the x86 machines of this project they "
                           "crashed on the first decode (SIGSEGV in ggml_backend_amx_mul_mat). Rebuild "
                           "with GGML_NATIVE=OFF (see docs/EDGE_HARDWARE.md) or load with "
                           "use_extra_bufts=False.")
    return info


# 3. GPU, energy, models ----------------------------------------------------------------------------
def parse_tegra_release(text: str) -> dict:
    """`# R36 (release), REVISION: 4.3, ...` -> {"l4t": "36.4.3", "jetpack": "6"}."""
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    if not match:
        return {"l4t": None, "jetpack": None}
    return {"l4t": f"{match.group(1)}.{match.group(2)}", "jetpack": JETPACK_BY_L4T.get(match.group(1))}


def gpu_section(root: Path) -> dict:
    section: dict[str, Any] = {"nvidia_smi": None, "jetson": None}
    if shutil.which("nvidia-smi"):
        try:
            out = energy.run_command(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                      "--format=csv,noheader"])
            section["nvidia_smi"] = [line.strip() for line in out.splitlines() if line.strip()]
        except energy.SensorError as exc:
            section["nvidia_smi"] = f"error: {exc}"
    tegra = _read(root / "etc/nv_tegra_release")
    if tegra:
        section["jetson"] = parse_tegra_release(tegra)
    return section


def _cache_dir() -> Path:
    try:
        return importlib.import_module("models.store").cache_dir()
    except Exception:  # same rule as models.store.cache_dir, for an install without `models`
        explicit = os.environ.get("PICOSPEC_CACHE")
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return Path(explicit) if explicit else base / "picospec"


# Run in a child: describing a transformers-directory target imports transformers, which must never
# enter an edge process; the child also cannot join or fetch (join=False, fetch=False), and a
# describe_models whose signature cannot promise that is not called at all (exit 3).
_MODELS_PROBE = """
import inspect, json, sys
sys.path[:] = [p for p in sys.path if p]  # not the working directory: PYTHONPATH decides
try:
    from models.cli import describe_models as describe
except ImportError:
    from models import describe_models as describe
params = inspect.signature(describe).parameters
if 'join' not in params:
    sys.exit(3)
print(json.dumps(describe(**{k: False for k in ('join', 'fetch') if k in params}), default=str))
"""


def models_section(python: str = sys.executable) -> dict:
    """`models.describe_models(join=False, fetch=False)` when it can be asked that way; otherwise
    what lies in the cache directory."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [p for p in (os.environ.get("PYTHONPATH"), *sys.path) if p])}
    try:
        done = subprocess.run([python, "-c", _MODELS_PROBE], capture_output=True, text=True,
                              timeout=120, env=env)
        if done.returncode == 0:
            return {"described": json.loads(done.stdout.strip().splitlines()[-1])}
        why = ("models.describe_models() cannot promise not to join; not called" if done.returncode == 3
               else "models.describe_models() unavailable: "
               + (done.stderr.strip().splitlines() or ["?"])[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        why = f"models.describe_models() failed: {exc}"
    cache = _cache_dir()
    files = sorted(p for p in cache.rglob("*") if p.is_file()) if cache.is_dir() else []
    return {"note": why, "cache_dir": str(cache), "exists": cache.is_dir(),
            "files": [{"path": str(p.relative_to(cache)), "bytes": p.stat().st_size} for p in files[:50]]}


# 4. Recommendations --------------------------------------------------------------------------------
def recommend_threads(physical: int | None, logical: int | None) -> tuple[int, str]:
    cores = physical or logical or 1
    if cores > 2:
        return cores - 1, f"{cores} physical cores, one left for the network loop"
    return cores, f"{cores} physical core(s): all of them (too few to spare one)"


def recommend_mode(rtt_ms: float | None, draft_ms: float | None, verify_ms: float | None,
                   acceptance: float | None, threads: int) -> dict:
    """pipeline / sync / cloud: whichever the performance model in edge_app.policy rates fastest."""
    numbers, assumed = {}, {}
    draft_key = "draft_ms_2t" if threads >= 2 else "draft_ms_1t"
    for name, given, key in (("rtt_ms", rtt_ms, "rtt_ms"), ("draft_ms", draft_ms, draft_key),
                             ("verify_ms", verify_ms, "verify_ms"), ("acceptance", acceptance, "acceptance")):
        numbers[name] = given if given is not None else ASSUMED[key][0]
        if given is None:
            assumed[name] = f"{ASSUMED[key][0]:g} ({ASSUMED[key][1]})"
    try:
        policy = importlib.import_module("edge_app.policy")
        a, secs = numbers["acceptance"], [numbers[k] / 1e3 for k in ("draft_ms", "rtt_ms", "verify_ms")]
        pipe = policy.choose_plan(a, *secs, allow_sync=False)
        sync_rate, sync_block = max((policy.sync_rate(a, g, *secs), g) for g in range(1, 13))
        rates = {"pipeline": pipe.rate, "sync": sync_rate, "cloud": policy.cloud_rate(secs[1], secs[2])}
    except Exception as exc:
        return {"inputs": numbers, "assumed": assumed, "error": f"performance model unavailable: {exc}"}
    mode = max(rates, key=rates.get)
    block = {"pipeline": pipe.block, "sync": sync_block, "cloud": None}[mode]
    # how many blocks the edge drafts during one round trip + verify (the pipeline's depth)
    depth = math.ceil((numbers["rtt_ms"] + numbers["verify_ms"]) / (pipe.block * numbers["draft_ms"]))
    return {"mode": mode, "block": block, "run_ahead_tokens": pipe.run_ahead if mode == "pipeline" else 0,
            "blocks_to_cover_round_trip": max(1, depth) if mode == "pipeline" else None,
            "modelled_tok_s": rates, "inputs": numbers, "assumed": assumed}


def verify_curve_section(cloud: str | None, token: str | None = None) -> dict:
    """The verifier's T(k) (ms per verify pass of k tokens), measured over the protocol when a
    verifier URL is given; the edge itself cannot run the target."""
    if not cloud:
        return {"measured": False, "note": "give --cloud URL (a running verifier) to measure T(k)"}
    import asyncio

    from edge_app.link import CloudError, CloudLink
    from edge_app.probe import measure_verify_curve
    from models.fingerprint import from_gguf
    from models.resolve import ensure_ready, resolve_draft

    async def probe() -> dict[int, float]:
        link = CloudLink(cloud)
        fingerprint = from_gguf(ensure_ready(resolve_draft(None))).to_dict()
        await link.connect(codec.Hello(fingerprint=fingerprint, sampling={"temperature": 0.0, "top_p": 1.0,
                                                                          "top_k": 0, "seed": None},
                                       token=token, client="picospec-doctor"))
        try:
            return await measure_verify_curve(link, link.welcome.vocab_size)
        finally:
            await link.close()

    try:
        curve = asyncio.run(probe())
    except (CloudError, OSError, ValueError) as err:
        return {"measured": False, "note": f"could not measure T(k) at {cloud}: {err}"}
    ms = {k: round(v * 1e3, 1) for k, v in sorted(curve.items())}
    return {"measured": True, "cloud": cloud, "t_ms": ms,
            "t8_over_t1": round(curve[8] / curve[1], 2) if 1 in curve and 8 in curve else None}


def collect(rtt_ms: float | None = None, draft_ms: float | None = None,
            verify_ms: float | None = None, acceptance: float | None = None,
            root: str | Path = "/", cloud: str | None = None, token: str | None = None) -> dict:
    """Everything `picospec doctor` reports, as a JSON-ready dict."""
    root = Path(root)
    curve = verify_curve_section(cloud, token)
    if verify_ms is None and curve["measured"]:
        verify_ms = curve["t_ms"].get(4)  # a typical block
    cpu = cpu_section(root)
    memory = parse_meminfo(_read(root / "proc/meminfo") or "")
    threads, why = recommend_threads(cpu["physical_cores"], cpu["logical_cores"])
    report = {"cpu": cpu, "memory": memory, "os": system_section(root), "llama_cpp": llama_cpp_section(),
              "gpu": gpu_section(root), "energy_sensors": energy.sensor_report(root),
              "models": models_section(), "verify_curve": curve}
    notes = []
    if (memory["available_mib"] or 1e9) < 1024:
        notes.append("under 1 GiB available: the default draft needs ~0.6 GiB RSS")
    if report["gpu"]["jetson"] and not report["llama_cpp"].get("gpu_offload"):
        notes.append("Jetson: build llama-cpp-python with CMAKE_ARGS=-DGGML_CUDA=on and offload the "
                     "draft (n_gpu_layers=-1)")
    report["emulated"] = emulated(report["os"]["arch"], cpu.get("features") or [])
    if report["emulated"]:
        notes.append(f"{report['os']['arch']} under emulation on an x86 host: speed, draft time, the "
                     "recommended settings and energy are the emulator's, not a real device's")
    report["recommendations"] = {"threads": threads, "threads_reason": why, "notes": notes,
                                 **recommend_mode(rtt_ms, draft_ms, verify_ms, acceptance, threads)}
    return report


# 5. Command line -----------------------------------------------------------------------------------
def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("doctor", help="describe this device and recommend edge settings")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--rtt-ms", type=float, help="round-trip time to the cloud, in ms")
    p.add_argument("--draft-ms", type=float, help="measured draft time per token, in ms")
    p.add_argument("--verify-ms", type=float, help="measured cloud verify pass, in ms")
    p.add_argument("--acceptance", type=float, help="measured per-token acceptance (0..1)")
    p.add_argument("--cloud", default=None, help="a running verifier (ws://host:port): measure its T(k) curve")
    p.add_argument("--token", default=None, help="the verifier's shared secret, if it has one")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = collect(args.rtt_ms, args.draft_ms, args.verify_ms, args.acceptance,
                     cloud=args.cloud, token=args.token)
    print(json.dumps(report, indent=2, default=str) if args.json else render(report))
    return 0


def render(report: dict) -> str:
    """The human-readable report."""
    cpu, mem, osr, llama = report["cpu"], report["memory"], report["os"], report["llama_cpp"]
    rec = report["recommendations"]
    lines = [f"device   {osr['board'] or osr['system']} ({osr['arch']}), {osr['distro'] or osr['release']}",
             f"cpu      {cpu['model']}: {cpu['physical_cores']} physical / {cpu['logical_cores']} logical cores",
             f"features {' '.join(cpu['features']) or '(none of interest)'}",
             f"memory   {_mib(mem['available_mib'])} available of {_mib(mem['total_mib'])}",
             f"python   {osr['python']} ({osr['python_executable']})"]
    if llama.get("version"):
        lines.append(f"llama.cpp {llama['version']} (gpu offload: {llama['gpu_offload']}, "
                     f"AMX compiled in: {llama['amx_compiled']})")
    else:
        lines.append(f"llama.cpp not usable: {llama.get('error')}")
    if llama.get("warning"):
        lines.append(f"  WARNING {llama['warning']}")
    gpu = report["gpu"]
    lines.append(f"gpu      nvidia-smi: {gpu['nvidia_smi'] or 'none'}; jetson: {gpu['jetson'] or 'no'}")
    for s in report["energy_sensors"]:
        lines.append(f"energy   {s['source']:<15} {'yes' if s['available'] else 'no '} {s['detail']}")
    models = report["models"]
    if "described" in models:
        lines += [f"models   {line}" for line in _model_lines(models["described"])]
    else:
        lines.append(f"models   cache {models['cache_dir']}: {len(models['files'])} file(s) ({models['note']})")
    curve = report.get("verify_curve") or {}
    if curve.get("measured"):
        points = "  ".join(f"{k}: {v:g}" for k, v in curve["t_ms"].items())
        lines.append(f"T(k)     verify pass of k tokens, ms: {points}  (T(8)/T(1) {curve['t8_over_t1']})")
    else:
        lines.append(f"T(k)     {curve.get('note', 'not measured')}")
    lines.append(f"threads  {rec['threads']} ({rec['threads_reason']})")
    if "mode" in rec:
        rates = ", ".join(f"{k} {v:.2f}" for k, v in rec["modelled_tok_s"].items())
        plan = (f", block {rec['block']}, run-ahead {rec['run_ahead_tokens']} tokens"
                if rec["mode"] != "cloud" else " (drafting does not pay with these numbers)")
        lines.append(f"mode     {rec['mode']}{plan} (modelled tok/s: {rates})")
    else:
        lines.append(f"mode     {rec['error']}")
    lines += [f"  assumed {k} = {v}" for k, v in rec["assumed"].items()]
    lines += [f"note     {n}" for n in rec["notes"]]
    return "\n".join(lines)


def _model_lines(described: Any) -> list[str]:
    if not isinstance(described, dict):
        return [json.dumps(described, default=str)[:200]]
    lines = []
    for role in ("draft", "target"):
        e = described.get(role)
        if isinstance(e, dict):
            size = f", {e['size_bytes'] / 1e6:.0f} MB" if e.get("size_bytes") else ""
            lines.append(f"{role}: {e.get('name') or e.get('path')}{size}, checksum {e.get('checksum')}, "
                         f"ready {'yes' if e.get('ready') else 'no'}" + (f" ({e['error']})" if e.get("error") else ""))
    if "compatible" in described:
        lines.append(f"tokenizers {'compatible' if described['compatible'] else 'NOT compatible'}: "
                     f"{described.get('reason')}")
    return lines


def _mib(value: float | None) -> str:
    return "?" if value is None else f"{value / 1024:.1f} GiB"
