"""Layers point one way: sampling <- codec <- edge_app | cloud <- picospec and bench on top, with
models as a helper below edge_app, cloud, picospec and bench.

The check parses every module's source (no importing, so it sees what a Pi without torch would
run) and collects every import it names: at the top, inside functions, relative ones, and
importlib.import_module("...") with a literal name.
"""
from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

HEAVY = ("torch", "transformers")
# package -> what its modules must never import (a name and everything under it)
FORBIDDEN = {
    "cloud": ("edge_app", "bench", "picospec"),
    "edge_app": ("picospec", "cloud", "bench", *HEAVY),
    "codec": ("edge_app", "cloud", "picospec", "bench", "models", *HEAVY),
    "sampling": ("codec", "edge_app", "cloud", "picospec", "bench", "models", "transformers"),
    "models": ("edge_app", "cloud", "picospec", "bench"),
}
TORCH_RULE = "sampling.torch_rule"  # the torch half of the sampling math: the verifier's alone


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import in the file, wherever it sits."""
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[:len(package) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found.append((node.lineno, base))
            # `from sampling import torch_rule` imports a module too
            found += [(node.lineno, ".".join(filter(None, [base, a.name]))) for a in node.names if a.name != "*"]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            if name in ("import_module", "__import__"):
                found.append((node.lineno, node.args[0].value))
    return found


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def breach(package: str, module: str, name: str) -> str | None:
    """Why `module` (in `package`) may not import `name`; None when it may."""
    if any(_under(name, bad) for bad in FORBIDDEN.get(package, ())):
        return f"{package} must not import {name.split('.')[0]}"
    if package == "sampling" and _under(name, "torch") and module != TORCH_RULE:
        return "only sampling.torch_rule may use torch"
    if _under(name, TORCH_RULE) and package not in ("cloud", "sampling", "bench"):
        return "only the cloud (and the benchmarks above it) may use the torch rule"
    return None


def violations(root: Path) -> list[str]:
    """Every import that breaks a layer rule, as 'file:line imports name (why)'."""
    problems = []
    for package in (*FORBIDDEN, "picospec", "bench"):
        for path in sorted((root / package).rglob("*.py")):
            module, reported = module_name(path, root), set()
            for line, name in imported_names(path, root):
                why = breach(package, module, name)
                if why and line not in reported:  # one report per import statement
                    reported.add(line)
                    problems.append(f"{path.relative_to(root)}:{line} imports {name} ({why})")
    return problems


def test_the_layers_point_one_way():
    problems = violations(ROOT)
    assert not problems, "\n".join(problems)


def test_the_check_sees_imports_inside_functions_and_relative_ones():
    repl = imported_names(ROOT / "edge_app" / "repl.py", ROOT)
    assert "edge_app.client" in {name for _, name in repl}  # imported inside run()
    store = imported_names(ROOT / "models" / "store.py", ROOT)
    assert "models.errors" in {name for _, name in store}  # from .errors import ...
    doctor = imported_names(ROOT / "edge_app" / "doctor.py", ROOT)
    assert "edge_app.policy" in {name for _, name in doctor}  # importlib.import_module("edge_app.policy")


def test_the_check_flags_a_bad_module(tmp_path):
    """Negative control: a synthetic tree with one breach of each rule, and a clean module."""
    bad = {
        "cloud/uses_bench.py": "def f():\n    import bench.runner\n",
        "cloud/uses_edge.py": "from edge_app import pipeline\n",
        "edge_app/uses_torch.py": "def f():\n    import torch\n",
        "edge_app/uses_picospec.py": "from picospec.api import merge_stats\n",
        "edge_app/uses_cloud.py": "import importlib\nengine = importlib.import_module('cloud.engine')\n",
        "edge_app/uses_torch_rule.py": "from sampling import torch_rule\n",
        "codec/uses_models.py": "from models import resolve\n",
        "sampling/uses_codec.py": "from .. import codec\n",
        "sampling/core.py": "import torch\n",
        "models/uses_edge.py": "from edge_app.stats import merge_stats\n",
        "picospec/uses_torch_rule.py": "from sampling.torch_rule import accept\n",
    }
    good = {
        "sampling/torch_rule.py": "import torch\nfrom . import core\n",
        "cloud/verify.py": "import torch\nfrom sampling.torch_rule import accept\nfrom codec import messages\n",
        "edge_app/loop.py": "import numpy\nfrom codec import messages\nfrom models.resolve import resolve\nfrom .stats import x\n",
        "codec/messages.py": "import msgpack\nfrom sampling import SamplingParams\n",
        "picospec/api.py": "from edge_app.client import EdgeClient\n",
        "bench/sampling_speed.py": "from sampling.torch_rule import accept\n",
    }
    for rel, source in {**bad, **good}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(source)
    problems = violations(tmp_path)
    flagged = {p.split(":")[0] for p in problems}
    assert flagged == set(bad), "\n".join(problems)
