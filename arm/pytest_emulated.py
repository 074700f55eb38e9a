"""pytest plugin for the edge's tests under qemu-aarch64 user-mode emulation (`-p arm.pytest_emulated`).

Emulated code runs 10-50x slower than native, so Hypothesis' per-example deadline (200 ms by
default) and its too_slow health check would fail tests for the emulator's speed, not for a bug.
This profile lifts only those two; the number of examples each test draws is unchanged. Tests that
give their own settings keep them (most of the edge's already say deadline=None).
"""
from __future__ import annotations

import platform

from hypothesis import HealthCheck, settings

settings.register_profile("arm-emulated", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("arm-emulated")


def pytest_report_header(config):
    return f"arm-check: {platform.machine()} Python {platform.python_version()}, hypothesis profile arm-emulated"
