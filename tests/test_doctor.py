"""`picospec doctor`: parsers against real-looking device files, the recommendation model, the CLI
on this machine, and that the edge modules never pull in torch or transformers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_app import doctor

REPO = Path(__file__).resolve().parents[1]

X86_CPUINFO = "".join(
    f"processor\t: {cpu}\nvendor_id\t: GenuineIntel\nmodel\t\t: 143\n"
    f"model name\t: Intel(R) Xeon(R) Platinum 8480+\nphysical id\t: 0\ncore id\t\t: {cpu // 2}\n"
    "flags\t\t: fpu sse2 avx f16c fma avx2 avx512f avx512bw avx512_vnni amx_bf16 amx_tile amx_int8\n\n"
    for cpu in range(4))  # 2 cores with hyper-threading

PI5_CPUINFO = "".join(
    f"processor\t: {cpu}\nBogoMIPS\t: 108.00\n"
    "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\n"
    "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n"
    for cpu in range(4)) + "Revision\t: d04170\nSerial\t\t: 0123456789abcdef\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n"

ORIN_CPUINFO = "".join(
    f"processor\t: {cpu}\nmodel name\t: ARMv8 Processor rev 1 (v8l)\nBogoMIPS\t: 62.50\n"
    "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp uscat ilrcpc flagm\n"
    "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd42\nCPU revision\t: 1\n\n"
    for cpu in range(6))


def test_x86_cpuinfo_features_and_physical_cores():
    info = doctor.parse_cpuinfo(X86_CPUINFO)
    assert info["model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert info["logical_cores"] == 4 and info["physical_cores"] == 2
    assert {"avx2", "fma", "f16c", "avx512f", "avx512_vnni", "amx_tile", "amx_int8"} <= set(info["features"])
    assert "sse2" not in info["features"]


def test_pi5_cpuinfo_reports_board_core_and_dotprod():
    info = doctor.parse_cpuinfo(PI5_CPUINFO)
    assert info["model"] == "Raspberry Pi 5 Model B Rev 1.0"
    assert info["arm_core"] == "Cortex-A76"
    assert info["logical_cores"] == 4 and info["physical_cores"] is None  # ARM cpuinfo has no core id
    assert {"neon", "dotprod", "fp16"} <= set(info["features"])


def test_orin_cpuinfo_names_the_core():
    info = doctor.parse_cpuinfo(ORIN_CPUINFO)
    assert info["arm_core"] == "Cortex-A78AE" and info["logical_cores"] == 6
    assert "dotprod" in info["features"]


def test_physical_cores_from_sysfs_sibling_lists(tmp_path):
    for cpu, siblings in enumerate(("0,2", "1,3", "0,2", "1,3")):
        topo = tmp_path / f"sys/devices/system/cpu/cpu{cpu}/topology"
        topo.mkdir(parents=True)
        (topo / "thread_siblings_list").write_text(siblings + "\n")
    assert doctor.physical_cores_from_sysfs(tmp_path) == 2
    assert doctor.physical_cores_from_sysfs(tmp_path / "nothing") is None


def test_meminfo_in_mib():
    mem = doctor.parse_meminfo("MemTotal:        8253440 kB\nMemFree:  100 kB\nMemAvailable:    6291456 kB\n")
    assert mem == {"total_mib": pytest.approx(8060.0), "available_mib": pytest.approx(6144.0)}


def test_system_info_flags_and_tegra_release():
    flags = doctor.parse_system_info("CPU : SSE3 = 1 | AVX2 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | ")
    assert flags["AVX2"] == "1" and flags["AMX_INT8"] == "1"
    release = "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8\n"
    assert doctor.parse_tegra_release(release) == {"l4t": "36.4.3", "jetpack": "6"}
    assert doctor.parse_tegra_release("garbage") == {"l4t": None, "jetpack": None}


def test_threads_leave_one_core_for_the_network_loop():
    assert doctor.recommend_threads(4, 4)[0] == 3
    assert doctor.recommend_threads(2, 4)[0] == 2
    assert doctor.recommend_threads(None, 6)[0] == 5
    assert doctor.recommend_threads(None, None)[0] == 1


def test_modelled_rates_match_the_performance_model():
    # a=0.7, RTT 100 ms, draft 74 ms, verify 360 ms: sync at its best block is 1.34x cloud-only
    rec = doctor.recommend_mode(100, 74, 360, 0.7, threads=1)
    rates = rec["modelled_tok_s"]
    assert rates["cloud"] == pytest.approx(1 / 0.36)
    assert rates["sync"] / rates["cloud"] == pytest.approx(1.34, abs=0.01)
    assert rec["mode"] == max(rates, key=rates.get) and rec["assumed"] == {}


@pytest.mark.parametrize("rtt_ms, draft_ms, verify_ms, acceptance, mode", [
    # fast link, cheap draft, high acceptance: drafting ahead hides the round trip (model: +29% over sync)
    (20, 10, 50, 0.95, "pipeline"),
    # a draft step slower than the cloud's whole verify pass: drafting never pays
    (20, 400, 50, 0.9, "cloud"),
    # a slow CPU verifier next door and a coin-flip draft: one drafted token, then wait (+10% over pipeline)
    (5, 74, 300, 0.5, "sync"),
])
def test_the_recommended_mode_for_given_numbers(rtt_ms, draft_ms, verify_ms, acceptance, mode):
    rec = doctor.recommend_mode(rtt_ms, draft_ms, verify_ms, acceptance, threads=2)
    assert rec["mode"] == mode, rec["modelled_tok_s"]
    if mode == "pipeline":
        assert rec["block"] > 1 and rec["run_ahead_tokens"] > rec["block"]
        assert rec["blocks_to_cover_round_trip"] >= 1
    elif mode == "sync":
        assert rec["block"] == 1 and rec["run_ahead_tokens"] == 0
    else:
        assert rec["block"] is None


def test_unmeasured_numbers_are_labelled_with_their_origin():
    rec = doctor.recommend_mode(None, None, None, None, threads=2)
    assert set(rec["assumed"]) == {"rtt_ms", "draft_ms", "verify_ms", "acceptance"}
    assert "--verify-ms" in rec["assumed"]["verify_ms"] and "--rtt-ms" in rec["assumed"]["rtt_ms"]
    assert rec["inputs"]["draft_ms"] == 40.0  # the 2-thread measurement


def fake_models_package(tmp_path: Path, body: str) -> Path:
    package = tmp_path / "fake" / "models"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(body)
    return package.parent


def test_models_describe_is_asked_without_joining_or_fetching(monkeypatch, tmp_path):
    fake = fake_models_package(tmp_path, (
        "def describe_models(draft=None, target=None, *, join=True, fetch=False):\n"
        "    return {'asked_with': {'join': join, 'fetch': fetch}}\n"))
    monkeypatch.setenv("PYTHONPATH", str(fake))
    assert doctor.models_section() == {"described": {"asked_with": {"join": False, "fetch": False}}}


def test_models_fallback_lists_the_cache_dir(monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    (cache / "gguf").mkdir(parents=True)
    (cache / "gguf" / "draft.gguf").write_bytes(b"GGUF1234")
    monkeypatch.setenv("PICOSPEC_CACHE", str(cache))
    # a wrapper that cannot promise not to join is not called
    fake = fake_models_package(tmp_path, (
        "def describe_models(*args, **kwargs):\n"
        "    raise SystemExit('must not be called')\n"))
    monkeypatch.setenv("PYTHONPATH", str(fake))
    section = doctor.models_section()
    assert "cannot promise" in section["note"]
    assert section["cache_dir"] == str(cache)
    assert section["files"] == [{"path": "gguf/draft.gguf", "bytes": 8}]


def test_llama_probe_reports_amx_and_survives_a_crashing_build(monkeypatch, tmp_path):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "llama_cpp.py").write_text(
        "__version__ = '0.3.36'\n"
        "def llama_print_system_info(): return b'CPU : AVX2 = 1 | AMX_INT8 = 1 | '\n"
        "def llama_supports_gpu_offload(): return False\n")
    monkeypatch.setenv("PYTHONPATH", str(fake))
    info = doctor.llama_cpp_section()
    assert info["version"] == "0.3.36" and info["amx_compiled"] is True and "GGML_NATIVE=OFF" in info["warning"]
    crashing = tmp_path / "python"
    crashing.write_text("#!/bin/sh\nkill -ILL $$\n")
    crashing.chmod(0o755)
    info = doctor.llama_cpp_section(python=str(crashing))
    assert "crashed" in info["error"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "picospec.cli", "doctor", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=180)


def test_doctor_json_runs_on_this_machine():
    done = run_cli("--json", "--rtt-ms", "40")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report) >= {"cpu", "memory", "os", "llama_cpp", "gpu", "energy_sensors", "models",
                           "recommendations"}
    assert report["cpu"]["logical_cores"] >= 1
    assert [s["source"] for s in report["energy_sensors"]] == ["jetson-ina3221", "rpi5-pmic", "rapl", "nvml"]
    rec = report["recommendations"]
    assert rec["threads"] >= 1 and rec["inputs"]["rtt_ms"] == 40.0 and "rtt_ms" not in rec["assumed"]
    # the command recommends what the model says for this machine's threads and the given RTT
    expected = doctor.recommend_mode(40.0, None, None, None, threads=rec["threads"])
    assert (rec["mode"], rec["block"]) == (expected["mode"], expected["block"])


def test_doctor_text_runs_on_this_machine():
    done = run_cli()
    assert done.returncode == 0, done.stderr
    assert "threads" in done.stdout and "mode" in done.stdout and "energy" in done.stdout


def test_edge_modules_never_import_torch_or_transformers():
    code = ("import sys, edge_app.meters, edge_app.energy, edge_app.doctor\n"
            "edge_app.doctor.collect()\n"
            "bad = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
            "assert not bad, bad\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=180, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr


def test_an_arm_interpreter_on_an_x86_host_is_reported_as_emulated():
    from edge_app.doctor import emulated

    assert emulated("aarch64", ["avx", "avx2", "fma"])  # qemu-user: the host's cpuinfo shows through
    assert not emulated("aarch64", ["asimd", "fphp"])  # a real Pi or Jetson
    assert not emulated("x86_64", ["avx2"])
