"""Errors raised by `models`. Every message says what to do next, because the person reading it is
usually setting up a device, not reading our source."""
from __future__ import annotations


class ModelError(Exception):
    """A model cannot be found, joined, read or trusted. The message is meant for the user."""


class MissingPartsError(ModelError):
    """The PyPI packages carrying a default model's chunks are missing (or the wrong version)."""

    def __init__(self, message: str, missing: list[str] | None = None):
        super().__init__(message)
        self.missing = list(missing or [])  # pinned requirements, ready for pip


class ChecksumError(ModelError):
    """A file's size or sha256 is not what the registry promises."""


class GGUFFormatError(ModelError):
    """A file is not a GGUF file, or its header / metadata section is truncated or corrupt."""
