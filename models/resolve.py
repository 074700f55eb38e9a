"""Which model plays which role: an explicit flag, else $PICOSPEC_DRAFT / $PICOSPEC_TARGET, else the
default pair. Resolution is cheap (a stat and a 4-byte read); joining the defaults is ensure_ready's
job, so `--help` or a config check never waits on a 1 GB copy."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError
from .gguf_meta import is_gguf
from .registry import default_model
from .store import Progress, default_path, ensure_default

ENV_VARS = {"draft": "PICOSPEC_DRAFT", "target": "PICOSPEC_TARGET"}
FLAGS = {"draft": "--draft", "target": "--target"}
KINDS = ("gguf", "hf-dir")


@dataclass(frozen=True)
class ModelSpec:
    role: str  # "draft" | "target"
    name: str  # human name: the registry's for defaults, the file/directory name otherwise
    path: Path  # the GGUF file or the transformers directory (a default may not be joined yet)
    kind: str  # "gguf" | "hf-dir"
    is_default: bool
    sha256: str | None = None  # expected digest; only the pinned defaults have one
    size: int | None = None  # expected size in bytes, likewise
    source: str = "default"  # where the choice came from: "flag" | "env" | "default"

    def to_dict(self) -> dict[str, object]:
        return {"role": self.role, "name": self.name, "path": str(self.path), "kind": self.kind,
                "is_default": self.is_default, "sha256": self.sha256, "size": self.size,
                "source": self.source}


def _choose(role: str, explicit: str | os.PathLike[str] | None) -> tuple[str | None, str]:
    """(path or None for the default, where it came from). An empty value counts as unset."""
    if explicit is not None and str(explicit).strip():
        return str(explicit), "flag"
    env = os.environ.get(ENV_VARS[role], "").strip()
    if env:
        return env, "env"
    return None, "default"


def _origin(role: str, source: str) -> str:
    return FLAGS[role] if source == "flag" else f"${ENV_VARS[role]}"


def default_spec(role: str) -> ModelSpec:
    model = default_model(role)
    return ModelSpec(role=role, name=model.name, path=default_path(role), kind="gguf",
                     is_default=True, sha256=model.sha256, size=model.size, source="default")


def _existing(role: str, value: str, source: str) -> Path:
    p = Path(value).expanduser().absolute()
    if not p.exists():
        raise ModelError(f"{role} model not found: {p} (given by {_origin(role, source)})")
    return p


def resolve_draft(path: str | os.PathLike[str] | None = None) -> ModelSpec:
    """The draft: any GGUF file (it runs in llama.cpp on the edge)."""
    value, source = _choose("draft", path)
    if value is None:
        return default_spec("draft")
    p = _existing("draft", value, source)
    if p.is_dir():
        raise ModelError(f"the draft runs in llama.cpp and must be a GGUF file, but {p} is a "
                         f"directory (given by {_origin('draft', source)}); point at the .gguf "
                         f"inside")
    if not is_gguf(p):
        raise ModelError(f"{p} is not a GGUF file (given by {_origin('draft', source)}); the draft "
                         f"must be one (llama.cpp's convert_hf_to_gguf.py makes one from a "
                         f"transformers model)")
    return ModelSpec(role="draft", name=p.name, path=p, kind="gguf", is_default=False,
                     source=source)


def resolve_target(path: str | os.PathLike[str] | None = None) -> ModelSpec:
    """The target: a transformers directory (with config.json) or a GGUF file."""
    value, source = _choose("target", path)
    if value is None:
        return default_spec("target")
    p = _existing("target", value, source)
    origin = _origin("target", source)
    if p.is_dir():
        if not (p / "config.json").is_file():
            ggufs = sorted(x.name for x in p.glob("*.gguf"))
            hint = f"; to use a GGUF, point at the file ({', '.join(ggufs[:3])})" if ggufs else ""
            raise ModelError(f"{p} (given by {origin}) is a directory without config.json, so it "
                             f"is not a transformers model{hint}")
        return ModelSpec(role="target", name=p.name, path=p, kind="hf-dir", is_default=False,
                         source=source)
    if not is_gguf(p):
        raise ModelError(f"{p} (given by {origin}) is neither a GGUF file nor a transformers "
                         f"directory")
    return ModelSpec(role="target", name=p.name, path=p, kind="gguf", is_default=False,
                     source=source)


def resolve(role: str, path: str | os.PathLike[str] | None = None) -> ModelSpec:
    if role == "draft":
        return resolve_draft(path)
    if role == "target":
        return resolve_target(path)
    raise ValueError(f"unknown model role {role!r}")


def ensure_ready(spec: ModelSpec, progress: Progress | None = None) -> Path:
    """A usable path for the spec: defaults are joined and verified, user models must exist."""
    if spec.is_default:
        return ensure_default(spec.role, progress=progress)
    if not spec.path.exists():
        raise ModelError(f"{spec.role} model not found: {spec.path}")
    return spec.path
