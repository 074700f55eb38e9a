"""Energy readers against fixture trees laid out like the real devices, and the meter's honesty:
measured, a labelled estimate from the user's watts, or "not measured"."""
from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import pytest

from edge_app import energy
from edge_app.energy import (EnergyMeter, PowerFigures, counter_delta, find_ina3221_rails,
                             find_rapl_domains, joules_per_token, parse_pmic_adc, probe_jetson,
                             probe_nvml, probe_rapl, probe_rpi5, select_total_rails)


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


# RAPL -----------------------------------------------------------------------------------------
MAX_UJ = 262143328850


def make_rapl(root: Path, packages: dict[str, int]) -> None:
    """/sys/class/powercap as on an Intel laptop: packages with core/uncore/dram subdomains (nested
    and linked at top level, as sysfs does) and a psys platform domain that contains them."""
    powercap = root / "sys/class/powercap"
    write(powercap / "intel-rapl/enabled", "1")  # the control type, not a zone
    for index, (name, energy_uj) in enumerate(packages.items()):
        zone = powercap / f"intel-rapl:{index}"
        write(zone / "name", name)
        write(zone / "energy_uj", str(energy_uj))
        write(zone / "max_energy_range_uj", str(MAX_UJ))
        for sub, sub_name in enumerate(("core", "uncore", "dram")):
            nested = zone / f"intel-rapl:{index}:{sub}"
            write(nested / "name", sub_name)
            write(nested / "energy_uj", "5000000")
            write(nested / "max_energy_range_uj", str(MAX_UJ))
            (powercap / nested.name).symlink_to(nested)
    psys = powercap / f"intel-rapl:{len(packages)}"
    write(psys / "name", "psys")
    write(psys / "energy_uj", "999000000")
    write(psys / "max_energy_range_uj", str(MAX_UJ))


def set_rapl(root: Path, index: int, energy_uj: int) -> None:
    write(root / f"sys/class/powercap/intel-rapl:{index}/energy_uj", str(energy_uj))


def test_rapl_reads_package_domains_only(tmp_path):
    make_rapl(tmp_path, {"package-0": 1_000_000, "package-1": 2_000_000})
    domains = find_rapl_domains(tmp_path)
    assert [d.name for d in domains] == ["package-0", "package-1"]
    assert all(d.max_range_uj == MAX_UJ for d in domains)


def test_counter_delta_handles_wraparound():
    assert counter_delta(100, 350, 1000) == 250
    assert counter_delta(900, 50, 1000) == 150


def test_rapl_meter_difference_across_a_wrap(tmp_path):
    make_rapl(tmp_path, {"package-0": MAX_UJ - 2_000_000})
    sensor, detail = probe_rapl(tmp_path)
    assert sensor is not None and "package-0" in detail
    meter = EnergyMeter(sensor, poll_s=3600)
    meter.start()
    set_rapl(tmp_path, 0, 3_000_000)  # wrapped: 2 J before the top + 3 J after
    result = meter.stop()
    assert result["source"] == "rapl"
    assert result["joules"] == pytest.approx(5.0)
    assert result["formula"] is None


def test_rapl_meter_sums_polled_increments_so_two_wraps_are_not_lost(tmp_path):
    make_rapl(tmp_path, {"package-0": MAX_UJ - 1_000_000})
    sensor, _ = probe_rapl(tmp_path)
    meter = EnergyMeter(sensor, poll_s=3600)
    meter.start()
    for energy_uj in (1_000_000, MAX_UJ - 1_000_000):  # wrapped, then most of a lap more
        set_rapl(tmp_path, 0, energy_uj)
        meter._sample()  # what the polling thread does every poll_s
    set_rapl(tmp_path, 0, 1_000_000)  # wrapped again: start and stop alone would say 2 J
    result = meter.stop()
    assert result["joules"] == pytest.approx(2.0 + (MAX_UJ - 2_000_000) / 1e6 + 2.0)


def test_rapl_unreadable_counter_is_reported_not_guessed(tmp_path):
    make_rapl(tmp_path, {"package-0": 1})
    energy_uj = tmp_path / "sys/class/powercap/intel-rapl:0/energy_uj"
    energy_uj.unlink()
    energy_uj.mkdir()  # reading it raises, as a root-only file does for a user
    sensor, detail = probe_rapl(tmp_path)
    assert sensor is None and "unreadable" in detail


# Jetson INA3221 -------------------------------------------------------------------------------
def make_hwmon(root: Path, device: str, hwmon: str, channels: dict[int, tuple[str | None, int, int]],
               driver: str = "ina3221") -> Path:
    """JetPack 5/6 layout: /sys/bus/i2c/drivers/ina3221/<bus-addr>/hwmon/hwmonN/ with
    in{N}_label, in{N}_input (mV), curr{N}_input (mA), plus the summation channel in7."""
    base = root / "sys/bus/i2c/drivers" / driver / device / "hwmon" / hwmon
    write(base / "name", "ina3221")
    for index, (label, millivolts, milliamps) in channels.items():
        if label is not None:
            write(base / f"in{index}_label", label)
        write(base / f"in{index}_input", str(millivolts))
        write(base / f"curr{index}_input", str(milliamps))
        write(base / f"in{index + 3}_input", "1200")  # shunt voltage (uV), no label
    write(base / "in7_label", "sum of shunt voltages")
    write(base / "in7_input", "3600")
    write(base / "curr4_input", "9999")
    return base


def test_orin_nano_uses_the_module_input_rail(tmp_path):
    base = make_hwmon(tmp_path, "1-0040", "hwmon1", {
        1: ("VDD_IN", 5000, 1200), 2: ("VDD_CPU_GPU_CV", 5000, 400), 3: ("VDD_SOC", 5000, 300)})
    labels = [r.label for r in find_ina3221_rails(tmp_path)]
    assert labels == ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"]  # no "sum of shunt voltages"
    sensor, detail = probe_jetson(tmp_path)
    assert [r.label for r in sensor.rails] == ["VDD_IN"]
    assert sensor.watts() == pytest.approx(6.0)
    assert "VDD_IN" in detail
    # the meter integrates samples: 6 W at t=0, 8 W at t=10 -> 70 J (trapezoid)
    clock = FakeClock()
    meter = EnergyMeter(sensor, poll_s=3600, clock=clock)
    meter.start()
    write(base / "curr1_input", "1600")
    clock.t = 10.0
    result = meter.stop()
    assert result["source"] == "jetson-ina3221"
    assert result["joules"] == pytest.approx(70.0)


def test_agx_orin_sums_its_rails_and_skips_unconnected_channels(tmp_path):
    make_hwmon(tmp_path, "1-0040", "hwmon3", {
        1: ("VDD_GPU_SOC", 800, 5000), 2: ("VDD_CPU_CV", 800, 2500), 3: ("VIN_SYS_5V0", 5000, 1000)})
    make_hwmon(tmp_path, "1-0041", "hwmon4", {
        1: ("NC", 0, 0), 2: ("VDDQ_VDD2_1V8AO", 1800, 500), 3: (None, 0, 0)})
    rails = select_total_rails(find_ina3221_rails(tmp_path))
    assert [r.label for r in rails] == ["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO"]
    sensor, _ = probe_jetson(tmp_path)
    assert sensor.watts() == pytest.approx(4.0 + 2.0 + 5.0 + 0.9)


def test_jetpack4_iio_layout_reports_milliwatts(tmp_path):
    base = tmp_path / "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0"
    for index, (name, mw) in enumerate((("POM_5V_IN", 3000), ("POM_5V_GPU", 500), ("POM_5V_CPU", 900))):
        write(base / f"rail_name_{index}", name)
        write(base / f"in_power{index}_input", str(mw))
    sensor, _ = probe_jetson(tmp_path)
    assert [r.label for r in sensor.rails] == ["POM_5V_IN"]
    assert sensor.watts() == pytest.approx(3.0)


# Raspberry Pi 5 PMIC --------------------------------------------------------------------------
PI5_PMIC = """\
 3V7_WL_SW_A current(0)=0.05000000A
   3V3_SYS_A current(1)=0.10000000A
  DDR_VDD2_A current(3)=0.20000000A
  VDD_CORE_A current(7)=2.12345678A
      HDMI_A current(22)=0.02000000A
 3V7_WL_SW_V volt(8)=3.70000000V
   3V3_SYS_V volt(9)=3.30000000V
  DDR_VDD2_V volt(11)=1.10000000V
  VDD_CORE_V volt(15)=0.87654321V
      HDMI_V volt(23)=5.00000000V
     EXT5V_V volt(24)=5.12000000V
      BATT_V volt(25)=0.00915750V
"""
PI5_WATTS = 0.05 * 3.7 + 0.1 * 3.3 + 0.2 * 1.1 + 2.12345678 * 0.87654321 + 0.02 * 5.0


def test_parse_pmic_sums_rails_with_current_and_voltage():
    rails = parse_pmic_adc(PI5_PMIC)
    assert "EXT5V" not in rails and "BATT" not in rails
    assert rails["VDD_CORE"] == pytest.approx(2.12345678 * 0.87654321)
    assert sum(rails.values()) == pytest.approx(PI5_WATTS)
    assert parse_pmic_adc('error=1 error_msg="Command not registered"\n') == {}


def test_pi5_sensor_runs_vcgencmd_and_the_meter_integrates(tmp_path):
    calls = []

    def runner(argv):
        calls.append(tuple(argv))
        return PI5_PMIC

    sensor, detail = probe_rpi5(runner)
    assert sensor is not None and "PMIC" in detail
    assert calls[0] == ("vcgencmd", "pmic_read_adc")
    clock = FakeClock()
    meter = EnergyMeter(sensor, poll_s=3600, clock=clock)
    meter.start()
    clock.t = 2.0
    result = meter.stop()
    assert result["source"] == "rpi5-pmic"
    assert result["joules"] == pytest.approx(PI5_WATTS * 2.0)
    assert joules_per_token(result, 4) == pytest.approx(PI5_WATTS / 2.0)


def test_pi4_or_missing_vcgencmd_is_not_a_sensor():
    def pi4(argv):
        return 'error=1 error_msg="Command not registered"\n'

    assert probe_rpi5(pi4)[0] is None
    assert probe_rpi5(None, which=lambda name: None)[0] is None


# NVML -----------------------------------------------------------------------------------------
def fake_nvml(energy_mj=None, power_mw=None):
    class NVMLError(Exception):
        pass

    def energy(handle):
        if energy_mj is None:
            raise NVMLError("Not Supported")
        return energy_mj.pop(0)

    return SimpleNamespace(
        nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: 1, nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetTotalEnergyConsumption=energy, nvmlDeviceGetPowerUsage=lambda h: power_mw)


def test_nvml_prefers_the_energy_counter():
    nvml = fake_nvml(energy_mj=[1000, 1000, 4500])  # probe, start, stop (millijoules)
    sensor, _ = probe_nvml(nvml)
    assert sensor.kind == "counter"
    meter = EnergyMeter(sensor, poll_s=3600)
    meter.start()
    result = meter.stop()
    assert result["source"] == "nvml" and result["joules"] == pytest.approx(3.5)


def test_nvml_falls_back_to_power_samples():
    sensor, _ = probe_nvml(fake_nvml(power_mw=30000))
    assert sensor.kind == "power" and sensor.watts() == pytest.approx(30.0)


# No sensor: "not measured", or an estimate only from the user's watts ---------------------------
def no_sensor_here() -> bool:
    return not any(s["available"] for s in energy.sensor_report())


def test_this_machine_without_a_sensor_reports_not_measured():
    if not no_sensor_here():
        pytest.skip("this machine has an energy sensor")
    meter = EnergyMeter()
    assert meter.sensor is None
    with meter:
        sum(range(10_000))
    assert meter.result["joules"] is None
    assert meter.result["source"] == "not measured"
    assert meter.result["formula"] is None
    assert joules_per_token(meter.result, 10) is None


def test_estimate_only_from_given_watts_and_it_states_the_formula():
    if not no_sensor_here():
        pytest.skip("this machine has an energy sensor")
    wall, cpu = FakeClock(), FakeClock()
    meter = EnergyMeter(figures=PowerFigures(idle_watts=3.0, busy_watts=7.0, cores=4), clock=wall, cpu_clock=cpu)
    meter.start()
    wall.t, cpu.t = 10.0, 6.0
    result = meter.stop()
    assert result["source"] == "estimate"
    assert result["joules"] == pytest.approx(3.0 * 10.0 + (7.0 - 3.0) * 6.0 / 4)
    assert result["formula"].startswith("idle_W*wall_s + (busy_W - idle_W)*cpu_s/cores")
    assert "3*10.000" in result["formula"]


def test_a_failing_sensor_falls_back_to_the_estimate_and_says_why():
    class Broken:
        source, kind, scope, poll_s = "rapl", "counter", "test", 3600

        def read(self):
            raise PermissionError("root only")

    meter = EnergyMeter(Broken(), figures=PowerFigures(2.0, 4.0, 2))
    meter.start()
    result = meter.stop()
    assert result["source"] == "estimate"
    assert "rapl failed" in result["detail"] and "root only" in result["detail"]
    meter = EnergyMeter(Broken())
    meter.start()
    assert meter.stop()["source"] == "not measured"


def test_power_figures_and_flags_are_checked():
    with pytest.raises(ValueError):
        PowerFigures(idle_watts=5.0, busy_watts=3.0, cores=4)
    parser = argparse.ArgumentParser()
    energy.add_power_arguments(parser)
    assert energy.figures_from_args(parser.parse_args([])) is None
    figures = energy.figures_from_args(parser.parse_args(["--idle-watts", "2", "--busy-watts", "6", "--busy-cores", "4"]))
    assert figures == PowerFigures(2.0, 6.0, 4)
    with pytest.raises(ValueError):
        energy.figures_from_args(parser.parse_args(["--idle-watts", "2"]))
    assert joules_per_token({"joules": 10.0}, 0) is None
    assert joules_per_token(None, 5) is None
