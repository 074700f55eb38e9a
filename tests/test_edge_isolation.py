"""The edge runs on a Pi without PyTorch: no edge_app module imports torch or transformers, and the
`edge` extra does not pull them in."""
from __future__ import annotations

import json
import pkgutil
import re
import subprocess
import sys
import tomllib
from importlib import metadata

import edge_app
from tests.conftest import ROOT

HEAVY = ("torch", "transformers")


def test_importing_every_edge_module_leaves_torch_out():
    modules = sorted(m.name for m in pkgutil.iter_modules(edge_app.__path__, "edge_app."))
    assert "edge_app.pipeline" in modules and "edge_app.drafter" in modules
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "import picospec.api, picospec.cli, codec, sampling, models\n"
        "picospec.cli.build_parser()\n"
        f"print(json.dumps([h for h in {HEAVY!r} if h in sys.modules]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _closure(names: list[str]) -> set[str]:
    """Every installed distribution the given ones depend on (their extras' deps excluded)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [_name(r) for r in requires if "extra ==" not in r]
    return seen


def test_the_edge_extra_pulls_neither_torch_nor_transformers():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    edge = [_name(r) for r in pyproject["project"]["optional-dependencies"]["edge"]]
    edge += [_name(r) for r in pyproject["project"]["dependencies"]]
    assert "llama-cpp-python" in edge
    closure = _closure(edge)
    assert "llama-cpp-python" in closure and "numpy" in closure
    assert not set(HEAVY) & closure, sorted(closure)


def test_auto_dtype_picks_bf16_only_where_the_hardware_has_it():
    from cloud.engine import auto_dtype

    assert auto_dtype("cuda") == "bfloat16"
    assert auto_dtype("cpu", {"avx2", "fma"}) == "float32"
    assert auto_dtype("cpu", {"avx2", "avx512_bf16"}) == "bfloat16"
    assert auto_dtype("cpu", {"amx_bf16", "amx_tile"}) == "bfloat16"


def test_packaging_metadata_builds_without_deprecations():
    """The license as an SPDX expression (the table form stops building in 2027) and a single
    source root, so an editable install is a plain path entry rather than an import finder."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "Apache-2.0"
    assert "setuptools>=77" in pyproject["build-system"]["requires"]  # SPDX license support
    assert pyproject["tool"]["setuptools"]["package-dir"] == {"": "."}
    assert "editable_mode" not in (ROOT / "Makefile").read_text()
