"""Finding, joining, checking and describing models; tokenizer fingerprints.

Everything importable from here is stdlib-only, so the edge can use it. The cloud's target loader
lives in models.target_cache and imports torch/transformers when called.
"""
from __future__ import annotations

from .errors import ChecksumError, GGUFFormatError, MissingPartsError, ModelError
from .fingerprint import Fingerprint, compatible, from_gguf, from_hf_dir, from_tokenizer
from .gguf_meta import GGUFMetadata, read_metadata
from .registry import DEFAULTS, DefaultModel, Part
from .resolve import ModelSpec, ensure_ready, resolve, resolve_draft, resolve_target
from .store import cache_dir, ensure_default, file_sha256

__all__ = [
    "ChecksumError", "DEFAULTS", "DefaultModel", "Fingerprint", "GGUFFormatError",
    "GGUFMetadata", "MissingPartsError", "ModelError", "ModelSpec", "Part", "cache_dir",
    "compatible", "describe_models", "ensure_default", "ensure_ready", "file_sha256", "from_gguf",
    "from_hf_dir", "from_tokenizer", "read_metadata", "resolve", "resolve_draft",
    "resolve_target",
]


def describe_models(*args, **kwargs):  # type: ignore[no-untyped-def]
    """See models.cli.describe_models (kept there with the command that prints it)."""
    from .cli import describe_models as _describe

    return _describe(*args, **kwargs)
