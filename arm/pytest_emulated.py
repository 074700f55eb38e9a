"""pytest plugin for the edge's tests under qemu-aarch64 user-mode emulation (`-p arm.pytest_emulated`).

Emulated code runs 10-50x slower than native, so Hypothesis' per-example deadline (200 ms by
default) and its too_slow health check would fail tests for the emulator's speed, not for a bug.
This profile lifts only those two; the number of examples each test draws is unchanged. Tests that
give their own settings keep them (most of the edge's already say deadline=None).

The edge has no torch by design. A test whose own helper (a file under tests/, such as tests/tiny.py)
imports torch is reported as skipped, with that reason; a torch import from the edge's own code
(edge_app/, codec/, sampling/, picospec/) stays a failure, since that is the bug these tests guard.
"""
from __future__ import annotations

import platform
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

TESTS = Path(__file__).resolve().parents[1] / "tests"
HEAVY = ("torch", "transformers")

settings.register_profile("arm-emulated", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("arm-emulated")


def pytest_report_header(config):
    return f"arm-check: {platform.machine()} Python {platform.python_version()}, hypothesis profile arm-emulated"


def _test_side_heavy_import(excinfo) -> str | None:
    if not isinstance(excinfo.value, ModuleNotFoundError) or excinfo.value.name not in HEAVY:
        return None
    importer = Path(str(excinfo.traceback[-1].path)).resolve()  # the frame that ran the import
    return f"{importer.relative_to(TESTS.parent)} imports {excinfo.value.name}" if TESTS in importer.parents else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is None or report.when != "call" or not report.failed:
        return
    why = _test_side_heavy_import(call.excinfo)
    if why:
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"needs torch on the test side ({why}): not an edge test")
