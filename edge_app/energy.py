"""Energy on the edge device: a real sensor where the device has one, a labelled estimate only
from power figures the user supplies, and otherwise "not measured". Never a made-up figure.

Sources (each reader takes a filesystem root, so tests point it at fixture trees):
"rapl" (Intel/AMD package counters in /sys/class/powercap), "nvml" (NVIDIA GPU, via pynvml if
importable), "jetson-ina3221" (Jetson power rails in sysfs), "rpi5-pmic" (`vcgencmd pmic_read_adc`).

Why our own readers rather than zeus (zeus-ml), which covers RAPL, NVML, Jetson and, lately, the
Pi 5 PMIC: it depends on pandas, scikit-learn, pydantic, rich, tyro, httpx, amdsmi and
nvidia-ml-py (hundreds of MB to build or fetch on a Pi) for readers of a few lines each; it polls
in a spawned process per monitor; and its Jetson reader looks only under the older `ina3221x`
driver. Its notes agree with the facts used here: PMIC rails without a current channel are
skipped, and a vcgencmd read costs ~20+ ms, so the PMIC is polled at a few Hz.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Runner = Callable[[Sequence[str]], str]


class SensorError(RuntimeError):
    """A sensor that was found could not be read."""


def _read(path: Path) -> str:
    return path.read_text(encoding="ascii", errors="replace").strip()


# 1. RAPL (counter, microjoules) -------------------------------------------------------------
@dataclass(frozen=True)
class RaplDomain:
    name: str  # "package-0"
    energy_path: Path
    max_range_uj: int


def find_rapl_domains(root: str | Path = "/") -> list[RaplDomain]:
    """Package-level RAPL domains only. Subdomains (intel-rapl:0:0 core, :0:1 uncore, dram) sit
    inside their package and the psys/platform domain contains the packages: adding any of them
    would count the same joules twice."""
    domains = []
    for zone in sorted((Path(root) / "sys/class/powercap").glob("intel-rapl:*")):
        if zone.name.count(":") != 1 or not (zone / "energy_uj").exists():
            continue
        try:
            name = _read(zone / "name")
            max_range = int(_read(zone / "max_energy_range_uj"))
        except (OSError, ValueError):
            continue
        if name.startswith("package"):
            domains.append(RaplDomain(name, zone / "energy_uj", max_range))
    return domains


def counter_delta(start: int, end: int, max_range: int) -> int:
    """Increase of a counter that wraps to 0 after `max_range` (at most one wrap between reads:
    the meter reads every second, and a package counter takes many minutes to wrap)."""
    return end - start if end >= start else (max_range - start) + end


class RaplSensor:
    source = "rapl"
    kind = "counter"
    poll_s = 1.0

    def __init__(self, domains: Sequence[RaplDomain]) -> None:
        self.domains = list(domains)
        names = ", ".join(d.name for d in self.domains)
        self.scope = f"CPU package(s) {names} (RAPL; not the GPU, the board or the PSU)"

    def read(self) -> list[float]:
        return [float(_read(d.energy_path)) for d in self.domains]

    def joules(self, prev: Sequence[float], cur: Sequence[float]) -> float:
        return sum(counter_delta(int(a), int(b), d.max_range_uj)
                   for a, b, d in zip(prev, cur, self.domains)) / 1e6


# 2. Jetson INA3221 (power, mV x mA) -----------------------------------------------------------
# A rail that feeds the whole module; when one exists it alone is the total (Orin NX/Nano: VDD_IN).
INPUT_RAILS = ("VDD_IN", "POM_5V_IN", "5V_IN", "VIN")


@dataclass(frozen=True)
class PowerRail:
    label: str
    volt_path: Path | None = None  # mV
    curr_path: Path | None = None  # mA
    power_path: Path | None = None  # mW, the older iio driver reports power directly

    def watts(self) -> float:
        if self.power_path is not None:
            return float(_read(self.power_path)) / 1e3
        return float(_read(self.volt_path)) * float(_read(self.curr_path)) / 1e6


def find_ina3221_rails(root: str | Path = "/") -> list[PowerRail]:
    """Labelled INA3221 channels. JetPack 5/6 (hwmon): in{N}_label, in{N}_input (mV),
    curr{N}_input (mA) under /sys/bus/i2c/drivers/ina3221/<bus-addr>/hwmon/hwmonX. JetPack 4
    (iio, driver ina3221x): rail_name_{N}, in_power{N}_input (mW)."""
    rails = []
    drivers = Path(root) / "sys/bus/i2c/drivers"
    for hwmon in sorted(drivers.glob("ina3221*/*/hwmon/hwmon*")):
        for label_file in sorted(hwmon.glob("in*_label")):
            index = label_file.name[len("in"):-len("_label")]
            volt, curr = hwmon / f"in{index}_input", hwmon / f"curr{index}_input"
            if volt.exists() and curr.exists():  # the "sum of shunt voltages" channel has no curr
                rails.append(PowerRail(_read(label_file), volt_path=volt, curr_path=curr))
    for iio in sorted(drivers.glob("ina3221*/*/iio:device*")):
        for name_file in sorted(iio.glob("rail_name_*")):
            power = iio / f"in_power{name_file.name.rsplit('_', 1)[1]}_input"
            if power.exists():
                rails.append(PowerRail(_read(name_file), power_path=power))
    return rails


def select_total_rails(rails: Sequence[PowerRail]) -> list[PowerRail]:
    """The input rail if the board has one; otherwise every connected rail (AGX Orin has no
    input rail: VDD_GPU_SOC + VDD_CPU_CV + VIN_SYS_5V0 + VDDQ_VDD2_1V8AO)."""
    inputs = [r for r in rails if r.label.upper() in INPUT_RAILS]
    if inputs:
        return inputs
    return [r for r in rails if r.label and r.label.upper() != "NC" and "sum" not in r.label.lower()]


class PowerRailSensor:
    source = "jetson-ina3221"
    kind = "power"
    poll_s = 0.1

    def __init__(self, rails: Sequence[PowerRail]) -> None:
        self.rails = list(rails)
        labels = " + ".join(r.label for r in self.rails)
        self.scope = f"Jetson module rails {labels} (INA3221; carrier board not included)"

    def watts(self) -> float:
        return sum(r.watts() for r in self.rails)


# 3. Raspberry Pi 5 PMIC (power, V x A) ---------------------------------------------------------
_PMIC_LINE = re.compile(
    r"^\s*(?P<rail>\S+)_(?P<kind>[AV])\s+(?:current|volt)\(\d+\)="
    r"(?P<value>[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)[AV]\s*$")


def parse_pmic_adc(text: str) -> dict[str, float]:
    """Watts per rail from `vcgencmd pmic_read_adc`, for rails with both a current (`X_A
    current(n)=...A`) and a voltage (`X_V volt(m)=...V`); EXT5V and BATT carry a voltage only."""
    amps: dict[str, float] = {}
    volts: dict[str, float] = {}
    for line in text.splitlines():
        match = _PMIC_LINE.match(line)
        if match:
            table = amps if match["kind"] == "A" else volts
            table[match["rail"]] = float(match["value"])
    return {rail: amps[rail] * volts[rail] for rail in sorted(amps.keys() & volts.keys())}


def run_command(argv: Sequence[str], timeout_s: float = 5.0) -> str:
    """Run a command and return its stdout; raise SensorError when it fails."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError) as exc:
        raise SensorError(f"{argv[0]}: {exc}") from exc
    if done.returncode != 0:
        raise SensorError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


class Rpi5PmicSensor:
    source = "rpi5-pmic"
    kind = "power"
    poll_s = 0.2  # each read spawns vcgencmd and costs the firmware ~20+ ms: keep it a few Hz
    scope = ("Raspberry Pi 5 PMIC rails (SoC core, DRAM, I/O); not USB peripherals, the fan "
             "or the PMIC's own conversion losses")

    def __init__(self, runner: Runner = run_command, vcgencmd: str = "vcgencmd") -> None:
        self._runner = runner
        self._argv = (vcgencmd, "pmic_read_adc")

    def watts(self) -> float:
        rails = parse_pmic_adc(self._runner(self._argv))
        if not rails:
            raise SensorError("vcgencmd pmic_read_adc reported no rail with current and voltage")
        return sum(rails.values())


# 4. NVIDIA NVML (counter in mJ, or power in mW) -------------------------------------------------
class NvmlSensor:
    source = "nvml"
    poll_s = 0.5

    def __init__(self, nvml: Any, handles: Sequence[Any], kind: str) -> None:
        self._nvml, self._handles, self.kind = nvml, list(handles), kind
        self.scope = f"{len(self._handles)} NVIDIA GPU(s) via NVML (GPU board only, not the CPU)"

    def read(self) -> list[float]:
        return [float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h)) for h in self._handles]

    def joules(self, prev: Sequence[float], cur: Sequence[float]) -> float:
        return sum(b - a for a, b in zip(prev, cur)) / 1e3

    def watts(self) -> float:
        return sum(float(self._nvml.nvmlDeviceGetPowerUsage(h)) for h in self._handles) / 1e3


# 5. Detection ------------------------------------------------------------------------------------
def probe_rapl(root: str | Path = "/") -> tuple[RaplSensor | None, str]:
    domains = find_rapl_domains(root)
    if not domains:
        return None, "no /sys/class/powercap/intel-rapl:* package domain"
    sensor = RaplSensor(domains)
    try:
        sensor.read()
    except PermissionError:
        return None, "RAPL present but energy_uj is readable by root only (Linux >= 5.10)"
    except (OSError, ValueError) as exc:
        return None, f"RAPL present but unreadable: {exc}"
    return sensor, sensor.scope


def probe_jetson(root: str | Path = "/") -> tuple[PowerRailSensor | None, str]:
    rails = select_total_rails(find_ina3221_rails(root))
    if not rails:
        return None, "no labelled INA3221 rail under /sys/bus/i2c/drivers/ina3221*"
    sensor = PowerRailSensor(rails)
    try:
        sensor.watts()
    except (OSError, ValueError) as exc:
        return None, f"INA3221 rails present but unreadable: {exc}"
    return sensor, sensor.scope


def probe_rpi5(runner: Runner | None = None,
               which: Callable[[str], str | None] = shutil.which) -> tuple[Rpi5PmicSensor | None, str]:
    if runner is None:
        if which("vcgencmd") is None:
            return None, "vcgencmd not found (not a Raspberry Pi OS install)"
        runner = run_command
    sensor = Rpi5PmicSensor(runner)
    try:
        sensor.watts()
    except SensorError as exc:
        return None, f"no Pi 5 PMIC readings: {exc}"
    return sensor, sensor.scope


def probe_nvml(nvml: Any = None) -> tuple[NvmlSensor | None, str]:
    if nvml is None:
        try:
            import pynvml as nvml  # optional: nvidia-ml-py
        except ImportError:
            return None, "pynvml not installed"
    try:
        nvml.nvmlInit()
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    except Exception as exc:  # NVMLError and friends: no driver, no GPU
        return None, f"NVML unavailable: {exc}"
    if not handles:
        return None, "NVML found no GPU"
    for kind, probe in (("counter", nvml.nvmlDeviceGetTotalEnergyConsumption),
                        ("power", nvml.nvmlDeviceGetPowerUsage)):
        try:
            for handle in handles:
                probe(handle)
        except Exception:  # energy counter needs Volta or newer; fall back to power
            continue
        sensor = NvmlSensor(nvml, handles, kind)
        return sensor, sensor.scope
    return None, "NVML reports neither energy nor power for these GPUs"


# Board-level sensors first (they cover the most of what the draft costs), then the CPU package,
# then the GPU: on a laptop the draft runs on the CPU unless it is offloaded.
SOURCE_ORDER = ("jetson-ina3221", "rpi5-pmic", "rapl", "nvml")


def probe_all(root: str | Path = "/", runner: Runner | None = None,
              nvml: Any = None) -> list[tuple[str, Any, str]]:
    """(source, sensor or None, scope or the reason it is unavailable), in SOURCE_ORDER."""
    found = {"jetson-ina3221": probe_jetson(root), "rpi5-pmic": probe_rpi5(runner),
             "rapl": probe_rapl(root), "nvml": probe_nvml(nvml)}
    return [(name, *found[name]) for name in SOURCE_ORDER]


def sensor_report(root: str | Path = "/", runner: Runner | None = None, nvml: Any = None) -> list[dict]:
    """JSON-ready list of the energy sources and whether each is usable here (for doctor)."""
    return [{"source": name, "available": sensor is not None, "detail": detail}
            for name, sensor, detail in probe_all(root, runner, nvml)]


def pick_sensor(root: str | Path = "/", runner: Runner | None = None, nvml: Any = None) -> Any:
    """The first usable sensor in SOURCE_ORDER, or None."""
    for _name, sensor, _detail in probe_all(root, runner, nvml):
        if sensor is not None:
            return sensor
    return None


# 6. Estimate from user-supplied power figures ---------------------------------------------------
@dataclass(frozen=True)
class PowerFigures:
    idle_watts: float
    busy_watts: float  # the whole device with every core busy
    cores: int

    def __post_init__(self) -> None:
        if not 0.0 <= self.idle_watts <= self.busy_watts or self.cores < 1:
            raise ValueError("need 0 <= idle_watts <= busy_watts and cores >= 1")


def estimate_joules(figures: PowerFigures, wall_s: float, cpu_s: float) -> tuple[float, str]:
    """Idle power for the whole interval plus the busy increment in proportion to the CPU time
    used (cpu_s / cores = the interval's equivalent of all cores busy). Returns (J, formula)."""
    joules = figures.idle_watts * wall_s + (figures.busy_watts - figures.idle_watts) * cpu_s / figures.cores
    formula = (f"idle_W*wall_s + (busy_W - idle_W)*cpu_s/cores = {figures.idle_watts:g}*{wall_s:.3f}"
               f" + ({figures.busy_watts:g} - {figures.idle_watts:g})*{cpu_s:.3f}/{figures.cores}")
    return joules, formula


# 7. The meter -----------------------------------------------------------------------------------
class EnergyMeter:
    """Joules over an interval. `with EnergyMeter() as em: ...` then `em.result`, or
    `em.start()` ... `em.stop()`. Counter sources are read every `poll_s` (so a wrap between
    reads is caught) and the increments summed; power sources are sampled in a background
    thread and integrated with the trapezoid rule."""

    def __init__(self, sensor: Any = None, *, auto_detect: bool = True,
                 figures: PowerFigures | None = None, root: str | Path = "/",
                 runner: Runner | None = None, poll_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 cpu_clock: Callable[[], float] = time.process_time) -> None:
        self.sensor = sensor if sensor is not None or not auto_detect else pick_sensor(root, runner)
        self.figures = figures
        self.poll_s = poll_s if poll_s is not None else getattr(self.sensor, "poll_s", 1.0)
        self._clock, self._cpu_clock = clock, cpu_clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.result: dict | None = None

    def __enter__(self) -> EnergyMeter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._t0, self._cpu0 = self._clock(), self._cpu_clock()
        self._joules, self._prev, self._samples, self._errors = 0.0, None, [], []
        self.result = None
        if self.sensor is None:
            return
        self._sample()
        # a counter whose first read failed would report only part of the interval
        self._counter_ok = self.sensor.kind != "counter" or self._prev is not None
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="energy-meter", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._sample()

    def _sample(self) -> None:
        try:
            if self.sensor.kind == "counter":
                cur = self.sensor.read()
                if self._prev is not None:
                    self._joules += self.sensor.joules(self._prev, cur)
                self._prev = cur
            else:
                self._samples.append((self._clock(), self.sensor.watts()))
        except Exception as exc:  # a flaky sensor must never break decoding: note it, go on
            self._errors.append(f"{type(exc).__name__}: {exc}")

    def stop(self) -> dict:
        """Stop measuring and return {joules, source, formula, scope, wall_s, detail}."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._sample()
        wall_s, cpu_s = self._clock() - self._t0, self._cpu_clock() - self._cpu0
        self.result = self._report(wall_s, cpu_s)
        return self.result

    def _report(self, wall_s: float, cpu_s: float) -> dict:
        result = {"joules": None, "source": "not measured", "formula": None, "scope": None,
                  "wall_s": wall_s, "detail": None}
        if self.sensor is not None:
            joules = self._measured_joules()
            if joules is not None:
                method = ("counter increments" if self.sensor.kind == "counter" else
                          f"trapezoid over {len(self._samples)} power samples")
                result.update(joules=joules, source=self.sensor.source, scope=self.sensor.scope,
                              detail=f"{method} every {self.poll_s:g} s")
                return result
            result["detail"] = f"{self.sensor.source} failed: {self._errors[-1] if self._errors else 'no samples'}"
        if self.figures is not None:
            joules, formula = estimate_joules(self.figures, wall_s, cpu_s)
            result.update(joules=joules, source="estimate", formula=formula,
                          scope="whole device, from the user's idle/busy watts and this process's CPU time")
        return result

    def _measured_joules(self) -> float | None:
        if self.sensor.kind == "counter":
            return self._joules if self._counter_ok and self._prev is not None else None
        if len(self._samples) < 2:
            return None
        return sum((t1 - t0) * (w0 + w1) / 2.0
                   for (t0, w0), (t1, w1) in zip(self._samples, self._samples[1:]))


def joules_per_token(result: dict | None, tokens: int) -> float | None:
    """Joules per generated token, or None when energy was not measured or no token came out."""
    if not result or result.get("joules") is None or tokens <= 0:
        return None
    return result["joules"] / tokens


def add_power_arguments(parser: argparse.ArgumentParser) -> None:
    """--idle-watts/--busy-watts/--busy-cores, for commands that report energy (bench, chat)."""
    parser.add_argument("--idle-watts", type=float, help="device power at idle, for an energy "
                        "estimate where no sensor exists (needs --busy-watts)")
    parser.add_argument("--busy-watts", type=float, help="device power with every core busy")
    parser.add_argument("--busy-cores", type=int, default=os.cpu_count() or 1,
                        help="cores that --busy-watts was measured with (default: all)")


def figures_from_args(args: argparse.Namespace) -> PowerFigures | None:
    """PowerFigures when both watts were given, else None (a half-given pair is an error)."""
    idle, busy = getattr(args, "idle_watts", None), getattr(args, "busy_watts", None)
    if idle is None and busy is None:
        return None
    if idle is None or busy is None:
        raise ValueError("--idle-watts and --busy-watts go together")
    return PowerFigures(idle, busy, args.busy_cores)
