"""The target model on the cloud side, with a safetensors copy of GGUF targets. Cloud-only.

transformers can load a GGUF target directly, but it dequantises every tensor on the way (~40 s for
the 1.5B on 2 cores, plus 8-22 s for the tokenizer). The first load therefore saves what it got
(state dict as safetensors, config, generation config, tokenizer files) under
    <cache>/targets/<sha256[:16]>-<dtype>/
and later loads read that directory in a second or two. `save_pretrained` refuses a GGUF-loaded
model, hence the manual save. The directory is written under a temporary name and renamed, so a
crash never leaves a half-written copy that looks complete.

torch and transformers are imported inside the functions: the edge imports `models` too.
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from .errors import ModelError
from .resolve import ModelSpec, ensure_ready
from .store import Progress, cache_dir, file_sha256

DTYPES = ("bfloat16", "float16", "float32")
STORE_DTYPE = "float32"  # the dtype of the cached copy of a GGUF target
_MARKER = "picospec.json"  # written last inside the copy; its presence means "complete"


def _torch_dtype(dtype: str) -> Any:
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def source_sha256(spec: ModelSpec, progress: Progress | None = None) -> str:
    """The GGUF's sha256: pinned for the defaults, hashed once (then memoised) for user files."""
    if spec.sha256:
        return spec.sha256
    return file_sha256(spec.path, progress=progress)


def cached_copy_dir(sha256: str, dtype: str, cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "targets" / f"{sha256[:16]}-{dtype}"


def is_complete(copy_dir: Path) -> bool:
    return (copy_dir / _MARKER).is_file() and (copy_dir / "config.json").is_file()


def _load_dir(directory: Path, dtype: str, device: str) -> tuple[Any, Any]:
    """A transformers directory (a user's, or our safetensors copy)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=_torch_dtype(dtype))
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    return model.to(device).eval(), tokenizer


def _load_gguf(path: Path, dtype: str) -> tuple[Any, Any]:
    """Load a GGUF fully dequantised. transformers can keep some architectures' weights packed in
    GGUF blocks (when the `kernels` package is present); a packed model cannot be saved as a plain
    checkpoint, and we want the dense copy anyway, so dequantising is asked for explicitly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=_torch_dtype(dtype),
        quantization_config=GgufConfig(dequantize=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tokenizer


def _is_dense(model: Any) -> bool:
    """No GGUF-packed layers left (GgufLinear, GgufEmbedding, ...): safe to save as safetensors."""
    return not any(type(m).__name__.startswith("Gguf") for m in model.modules())


def _drop_gguf_quantization(config_json: Path) -> None:
    """A GGUF-loaded config still says quant_method "gguf" and names the GGUF file. The copy holds
    plain dequantised tensors, so that entry would only make from_pretrained build a GGUF quantizer
    (and look for a file that is not there) on every later load."""
    cfg = json.loads(config_json.read_text())
    qc = cfg.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == "gguf":
        del cfg["quantization_config"]
        config_json.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _save_copy(model: Any, tokenizer: Any, dest: Path, record: dict[str, Any]) -> None:
    """Write the copy under a temporary name, then rename it into place."""
    from safetensors.torch import save_model

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        # save_model (not save_file) drops the tied lm_head alias; from_pretrained re-ties it.
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(str(tmp))
        _drop_gguf_quantization(tmp / "config.json")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / _MARKER).write_text(json.dumps(record, indent=1))
        try:
            os.replace(tmp, dest)
        except OSError:
            if not is_complete(dest):  # somebody else's finished copy is as good as ours
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_target(spec: ModelSpec, dtype: str = "bfloat16", device: str = "cpu",
                progress: Progress | None = None, cache: Path | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) for the target, in eval mode on `device`.

    A GGUF target is loaded from its safetensors copy when one exists, else converted once and
    the copy written for next time. A transformers directory is loaded as it is."""
    _torch_dtype(dtype)  # fail on a bad dtype before any slow work
    if spec.kind == "hf-dir":
        return _load_dir(spec.path, dtype, device)
    if spec.kind != "gguf":
        raise ModelError(f"cannot load a target of kind {spec.kind!r}")
    sha = source_sha256(spec, progress)
    # One float32 copy serves every dtype: casting it gives the same weights as dequantising the
    # GGUF straight to bf16, and a fresh machine converts once instead of once per dtype.
    copy_dir = cached_copy_dir(sha, STORE_DTYPE, cache)
    if is_complete(copy_dir):
        try:
            return _load_dir(copy_dir, dtype, device)
        except Exception as exc:  # a damaged copy: say where it is rather than guessing
            raise ModelError(f"the cached target copy {copy_dir} does not load ({exc}); "
                             f"delete that directory and it will be rebuilt from the GGUF") from exc
    gguf_path = ensure_ready(spec, progress)
    if progress:
        progress(f"converting {gguf_path.name} to a {STORE_DTYPE} safetensors copy (first time only, a few minutes)")
    t0 = time.monotonic()
    model, tokenizer = _load_gguf(gguf_path, STORE_DTYPE)
    record = {"source": str(gguf_path), "sha256": sha, "dtype": STORE_DTYPE,
              "converted_s": round(time.monotonic() - t0, 1), "created": time.time()}
    if not _is_dense(model):
        if progress:
            progress("the target loaded with GGUF-packed layers; not caching a safetensors copy")
        return model.to(dtype=_torch_dtype(dtype), device=device), tokenizer
    try:
        import transformers
        record["transformers"] = transformers.__version__
        _save_copy(model, tokenizer, copy_dir, record)
    except OSError as exc:  # a full or read-only disk costs speed next time, not this load
        if progress:
            progress(f"could not save the target copy in {copy_dir}: {exc}")
        return model.to(dtype=_torch_dtype(dtype), device=device), tokenizer
    if progress:
        progress(f"saved the {STORE_DTYPE} copy in {copy_dir}")
    # Serve the copy, not the GGUF-loaded object (which still carries a GGUF quantization config):
    # the first run then runs exactly what every later run will.
    del model, tokenizer
    gc.collect()
    return _load_dir(copy_dir, dtype, device)
