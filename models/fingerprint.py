"""Tokenizer fingerprints: can this draft and this target share token ids?

Speculative decoding sends token ids from the edge to the cloud, so both sides must mean the same
string by every id. The edge computes its fingerprint from the GGUF (no torch), the cloud from the
target's tokenizer, and the hello handshake compares them.

The hash covers the ordered token strings, after dropping trailing filler entries: GGUF converters
pad the token list up to the embedding size with names like "[PAD151665]", while a transformers
tokenizer simply has no token at those ids. Without the strip the same tokenizer would hash
differently depending on where it was read from.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import ModelError
from .gguf_meta import GGUFMetadata, read_metadata

# Fillers appended by conversions: "[PAD123]" (llama.cpp), "<|PAD_TOKEN|>", "<pad_7>", "<|pad|>".
_FILLER = re.compile(r"^(\[PAD\d+\]|<\|?pad(_?token)?(_?\d+)?\|?>)$", re.IGNORECASE)

# GGUF keys the fingerprint never needs: skipping them roughly halves the read time.
UNUSED_TOKENIZER_KEYS = ("tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                          "tokenizer.ggml.scores", "tokenizer.chat_template")


@dataclass(frozen=True)
class Fingerprint:
    vocab_size: int  # the logits width (embedding rows), padding included
    bos_id: int | None
    eos_id: int | None
    tokens_sha256: str  # of the real tokens, trailing fillers stripped
    n_tokens: int  # how many real tokens were hashed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Fingerprint":
        """Inverse of to_dict; also the gate for fingerprints arriving over the wire."""
        try:
            fp = cls(
                vocab_size=int(d["vocab_size"]),
                bos_id=None if d.get("bos_id") is None else int(d["bos_id"]),
                eos_id=None if d.get("eos_id") is None else int(d["eos_id"]),
                tokens_sha256=str(d["tokens_sha256"]),
                n_tokens=int(d["n_tokens"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a tokenizer fingerprint: {d!r} ({exc})") from None
        if not re.fullmatch(r"[0-9a-f]{64}", fp.tokens_sha256):
            raise ValueError(f"not a sha256 hex digest: {fp.tokens_sha256!r}")
        return fp

    @property
    def short(self) -> str:
        return self.tokens_sha256[:12]


def is_filler(token: str | None) -> bool:
    return token is None or bool(_FILLER.match(token))


def strip_fillers(tokens: Sequence[str | None]) -> Sequence[str | None]:
    end = len(tokens)
    while end and is_filler(tokens[end - 1]):
        end -= 1
    return tokens[:end]


def hash_tokens(tokens: Iterable[str | None]) -> str:
    """sha256 over length-prefixed UTF-8 tokens (the prefix makes the encoding unambiguous).

    A hole inside the vocabulary (an id with no token) hashes as a distinct marker, not as ""."""
    h = hashlib.sha256()
    for tok in tokens:
        if tok is None:
            h.update(b"\xff\xff\xff\xff")
            continue
        b = tok.encode("utf-8", "surrogateescape")
        h.update(len(b).to_bytes(4, "little"))
        h.update(b)
    return h.hexdigest()


def from_tokens(tokens: Sequence[str | None], vocab_size: int | None = None,
                bos_id: int | None = None, eos_id: int | None = None) -> Fingerprint:
    real = strip_fillers(tokens)
    return Fingerprint(
        vocab_size=int(vocab_size if vocab_size is not None else len(tokens)),
        bos_id=bos_id, eos_id=eos_id, tokens_sha256=hash_tokens(real), n_tokens=len(real),
    )


def read_gguf_for_fingerprint(path: str | os.PathLike[str]) -> GGUFMetadata:
    """The GGUF metadata without the keys a fingerprint never needs (about half the read time)."""
    return read_metadata(path, skip=UNUSED_TOKENIZER_KEYS)


def from_metadata(meta: GGUFMetadata) -> Fingerprint:
    tokens = meta.tokens
    if not tokens:
        raise ModelError(f"{meta.path}: the GGUF has no embedded tokenizer (tokenizer.ggml.tokens)")
    return from_tokens(tokens, meta.vocab_size, meta.bos_id, meta.eos_id)


def from_gguf(path: str | os.PathLike[str]) -> Fingerprint:
    """Fingerprint of the tokenizer embedded in a GGUF file (stdlib only, well under a second)."""
    return from_metadata(read_gguf_for_fingerprint(path))


def _first_id(value: Any) -> int | None:
    """Config ids may be an int, a list (several eos ids) or null."""
    if isinstance(value, list):
        value = value[0] if value else None
    return None if value is None else int(value)


def from_tokenizer(tokenizer: Any, vocab_size: int | None = None,
                   config: dict[str, Any] | None = None) -> Fingerprint:
    """Fingerprint of a loaded transformers tokenizer. `vocab_size` is the model's logits width
    (config.vocab_size); ids past the tokenizer's own length come back as None and are dropped."""
    config = config or {}
    if vocab_size is None:
        vocab_size = config.get("vocab_size") or len(tokenizer)
    n = max(int(vocab_size), len(tokenizer))
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id
    # Qwen-style tokenizers have no bos token of their own; the config (and GGUF) still name one.
    bos = bos if bos is not None else _first_id(config.get("bos_token_id"))
    eos = eos if eos is not None else _first_id(config.get("eos_token_id"))
    return from_tokens(tokens, int(vocab_size), bos, eos)


def read_config(directory: Path) -> dict[str, Any]:
    """config.json of a transformers model directory, with the text config of multimodal models
    (vocab_size lives there) folded in."""
    cfg = json.loads((directory / "config.json").read_text())
    text = cfg.get("text_config")
    if isinstance(text, dict):
        cfg = {**text, **{k: v for k, v in cfg.items() if v is not None and k != "text_config"}}
    return cfg


def from_hf_dir(directory: str | os.PathLike[str]) -> Fingerprint:
    """Fingerprint of a transformers model directory's tokenizer (imports transformers)."""
    d = Path(directory)
    try:
        from transformers import AutoTokenizer  # cloud-only dependency, imported on demand
    except ImportError as exc:
        raise ModelError(f"fingerprinting the tokenizer in {d} needs transformers "
                         f"(pip install 'picospec[cloud]'): {exc}") from None
    config = read_config(d)
    tokenizer = AutoTokenizer.from_pretrained(str(d))
    return from_tokenizer(tokenizer, config.get("vocab_size"), config)


def compatible(a: Fingerprint, b: Fingerprint,
               names: tuple[str, str] = ("draft", "target")) -> tuple[bool, str]:
    """(True, summary) when ids mean the same tokens on both sides and both stop on the same eos;
    otherwise (False, a reason that says exactly what differs)."""
    na, nb = names
    problems: list[str] = []
    if a.tokens_sha256 != b.tokens_sha256:
        if a.vocab_size != b.vocab_size:
            problems.append(f"{na} vocabulary {a.vocab_size} tokens vs {nb} {b.vocab_size}")
        elif a.n_tokens != b.n_tokens:
            problems.append(f"{na} has {a.n_tokens} real tokens vs {nb} {b.n_tokens}")
        problems.append(f"token lists differ (sha256 {a.short}.. vs {b.short}..)")
    if a.eos_id != b.eos_id:
        problems.append(f"eos id {a.eos_id} ({na}) vs {b.eos_id} ({nb})")
    if problems:
        return False, "; ".join(problems)
    sizes = (f"vocabulary {a.vocab_size}" if a.vocab_size == b.vocab_size
             else f"vocabulary {a.vocab_size} ({na}) / {b.vocab_size} ({nb})")
    note = "" if a.bos_id == b.bos_id else f"; bos differs ({a.bos_id} vs {b.bos_id}), not used"
    return True, (f"same tokenizer: {a.n_tokens} tokens, {sizes}, sha256 {a.short}.., "
                  f"eos {a.eos_id}{note}")
