"""The PicoSpec messages and encode / decode between them and frames.

A session, edge -> cloud and back:
    Hello -> Welcome                  the tokenizer fingerprints must match
    Prompt -> Prefilled               (re)set the committed context; the cloud prefills
    Draft -> Verdict, round after round: drafted ids in, accepted count + recovered / bonus out
    Generate -> Tokens                cloud-only generation, for comparison
    Error, Close                      either way

On the wire a message is a msgpack map: "v" (protocol version), "t" (type code) and one short key
per field. Fields equal to their default are left out, so a greedy 4-token Draft is ~30 bytes.
Unknown keys are refused: a new field is a new protocol version.
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any, Callable, Union

from codec import fields as F
from codec.errors import CodecError, bad_message
from codec.framing import pack_frame, unpack_frame
from codec.limits import (
    MAX_BLOCK,
    MAX_DECOMPRESSED,
    MAX_FRAME,
    MAX_PROMPT,
    MAX_STR,
    MAX_TOP_K,
    MAX_VOCAB,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
)
from sampling import SparseDist

VARIANTS = ("exact", "paper")


class VerdictKind(str, enum.Enum):
    """What a Verdict says beyond the accepted count.

    ACCEPTED: the block was accepted whole; no token (the last row verifies the next block).
    RECOVERED: rejected at position `accepted`; `token` is the recovered token the cloud sampled.
    BONUS: accepted whole and the edge is waiting; `token` is the bonus token.
    RECOVER_ON_EDGE: the paper variant's rejection; the edge samples the recovered token from
    norm(max(0, p - q)) with p the top-K in `top_ids` / `top_probs`.
    """

    ACCEPTED = "accepted"
    RECOVERED = "recovered"
    BONUS = "bonus"
    RECOVER_ON_EDGE = "recover_on_edge"

    @property
    def corrects(self) -> bool:
        """True when the verdict commits a token the edge did not draft: every later draft is stale."""
        return self is not VerdictKind.ACCEPTED


VERDICT_KINDS = tuple(k.value for k in VerdictKind)


@dataclass(frozen=True)
class Hello:
    """Edge -> cloud, first. fingerprint: the drafter's tokenizer; sampling: SamplingParams as a
    dict; variant: "exact" (sparse q uplink) or "paper" (q scalar up, top-K down)."""

    fingerprint: dict
    sampling: dict
    variant: str = "exact"
    paper_top_k: int = 8
    token: str | None = None
    client: str = ""


@dataclass(frozen=True)
class Welcome:
    """Cloud -> edge: the session is open; fingerprint is the target's tokenizer."""

    session_id: str
    fingerprint: dict
    model: str
    vocab_size: int
    server: str = ""


@dataclass(frozen=True)
class Prompt:
    """Edge -> cloud: (re)set the committed context to ids; the cloud keeps the common prefix of
    its cache and prefills the rest."""

    ids: list[int]
    max_new_tokens: int
    # the cloud may fill its idle time (while no fresh drafts are queued after a correction)
    # with target tokens of its own, sent as Tokens; the pipeline asks for it, sync does not
    fill: bool = False
    # ids[:shared] open many conversations (the chat template's system turn): the verifier may
    # keep their keys and values for other sessions' prompts; 0: nothing to share
    shared: int = 0


@dataclass(frozen=True)
class Prefilled:
    """Cloud -> edge: the committed context is in the cache; the edge drafts in `epoch` from now on.

    token: the answer's first token, sampled by the cloud from the prefill's last row and already
    committed (committed_len counts it); None when the Prompt asked for no new tokens. The edge
    drafts after it, so the first token costs one prefill, never a verify pass.
    """

    committed_len: int
    epoch: int
    prefill_s: float
    token: int | None = None


@dataclass(frozen=True)
class Draft:
    """Edge -> cloud: one round's drafted ids; pos is the absolute position of ids[0] (a forced
    id, when there is one, comes first and is ids[0]).

    dists: [len(ids)] what each id was sampled from (exact variant, sampling), each holding its
    id; q_scalar: [len(ids)] q(id) in (0, 1] (paper variant); greedy sends neither. A forced id
    counts too (a point mass, or 1.0). forced: how many leading ids are already decided (0 or 1).
    wait: see below (last, so the positional order stays).

    root: set, the Draft is a branch: ids were drafted after the token `root` standing at
    position pos - 1 instead of the drafted id there (the draft model's runner-up at a position it
    was unsure of). The verifier keeps it aside and verifies it only if a verdict recovers exactly
    `root` at pos - 1; the Verdict then names the branch's seq (Verdict.branch).
    """

    epoch: int
    pos: int
    ids: list[int]
    dists: list[SparseDist] | None = None
    q_scalar: list[float] | None = None
    forced: int = 0
    seq: int = 0
    wait: bool = False  # the edge has stopped drafting: a block accepted whole earns a bonus token
    root: int | None = None  # a branch: the token it assumes at pos - 1 (see above)


@dataclass(frozen=True)
class Verdict:
    """Cloud -> edge: the outcome of a Draft. epoch / pos / seq: those of the (merged) block it
    answers (pos as in Draft: the position of the block's first id, a forced one included); accepted: drafted ids kept; token: the recovered or
    bonus token (kind says which), None for ACCEPTED and RECOVER_ON_EDGE; new_epoch: the epoch
    the edge drafts in from now on. top_ids / top_probs: the target's top-K (paper variant)."""

    epoch: int
    pos: int
    accepted: int
    token: int | None
    kind: VerdictKind
    new_epoch: int
    verify_s: float = 0.0
    top_ids: list[int] | None = None
    top_probs: list[float] | None = None
    seq: int = 0
    fed: int = 0  # tokens the verify pass fed (its size k: the edge learns T(k) from verify_s)
    branch: int = 0  # seq of the branch Draft this verdict's recovered token took (queued next), 0: none

    def __post_init__(self) -> None:
        # a kind outside the enum is left as it is, for encode to refuse with a CodecError
        if isinstance(self.kind, str) and self.kind in VERDICT_KINDS:
            object.__setattr__(self, "kind", VerdictKind(self.kind))


@dataclass(frozen=True)
class Generate:
    """Edge -> cloud: continue the answer with the target alone, up to max_new_tokens more, never
    past the Prompt's max_new_tokens (the token in Prefilled counts)."""

    max_new_tokens: int


@dataclass(frozen=True)
class Tokens:
    """Cloud -> edge: target tokens the cloud committed itself, ids[0] at absolute position pos;
    done on the last one. Cloud-only answers stream this way; in the pipeline they are filled
    tokens (the cloud's own while it waits for fresh drafts). epoch: the epoch the edge drafts
    in from now on (a filled token that contradicts drafts already sent makes them stale)."""

    pos: int
    ids: list[int]
    done: bool
    epoch: int = 0


@dataclass(frozen=True)
class Error:
    """Either way: code (CodecError codes, or the server's own) and a readable message."""

    code: str
    message: str


@dataclass(frozen=True)
class Close:
    """Either way: the session is over."""

    reason: str = ""


Message = Union[Hello, Welcome, Prompt, Prefilled, Draft, Verdict, Generate, Tokens, Error, Close]


# ---- consistency between fields -----------------------------------------------------------


def _check_draft(m: Draft, vocab_size: int | None) -> None:
    n = len(m.ids)
    if m.root is not None and (m.forced or m.pos == 0 or not n or not m.seq):
        raise bad_message("Draft.root", "a branch has a seq, drafted ids after its root, and no forced id")
    if m.forced > n:
        raise bad_message("Draft.forced", f"{m.forced} forced ids but only {n} ids")
    if m.dists is not None and m.q_scalar is not None:
        raise bad_message("Draft", "dists (exact variant) and q_scalar (paper) are exclusive")
    if m.q_scalar is not None and len(m.q_scalar) != n:
        raise bad_message("Draft.q_scalar", f"{len(m.q_scalar)} values for {n} ids")
    if m.dists is not None:
        if len(m.dists) != n:
            raise bad_message("Draft.dists", f"{len(m.dists)} distributions for {n} ids")
        for i, (token, dist) in enumerate(zip(m.ids, m.dists)):
            # a drafted id outside its support could not have been sampled: q would be 0
            if dist.prob(int(token)) <= 0.0:
                raise bad_message(f"Draft.dists[{i}]", f"id {int(token)} is not in its support")


def _check_verdict(m: Verdict, vocab_size: int | None) -> None:
    has_token = m.kind in (VerdictKind.RECOVERED, VerdictKind.BONUS)
    if has_token != (m.token is not None):
        raise bad_message(
            "Verdict.token", f"kind {m.kind!r} {'needs' if has_token else 'takes no'} token"
        )
    if (m.top_ids is None) != (m.top_probs is None):
        raise bad_message("Verdict", "top_ids and top_probs come together")
    if m.top_ids is not None and len(m.top_ids) != len(m.top_probs):
        raise bad_message("Verdict.top_probs", f"{len(m.top_probs)} probs for {len(m.top_ids)} ids")


def _check_prompt(m: Prompt, vocab_size: int | None) -> None:
    if m.shared > len(m.ids):
        raise bad_message("Prompt.shared", f"{m.shared} shared ids but only {len(m.ids)} ids")


def _no_check(m: Any, vocab_size: int | None) -> None:
    return None


# ---- the schema ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Field:
    name: str
    key: str
    codec: F.FieldCodec
    required: bool
    default_wire: Any  # the wire form of the default: equal values are left out


@dataclass(frozen=True)
class _Schema:
    cls: type
    code: int
    fields: tuple[_Field, ...]
    check: Callable[[Any, int | None], None]
    keys: frozenset[str]


def _schema(
    cls: type, code: int, check: Callable[[Any, int | None], None], /, **codecs: Any
) -> _Schema:
    """codecs: field name -> (wire key, FieldCodec), in the dataclass's field order."""
    out = []
    for f in dataclasses.fields(cls):
        key, codec = codecs[f.name]
        required = f.default is dataclasses.MISSING
        default_wire = None if required else codec.enc(f.default, f"{cls.__name__}.{f.name}")
        out.append(_Field(f.name, key, codec, required, default_wire))
    keys = frozenset(f.key for f in out)
    assert len(keys) == len(out) and not keys & {"v", "t"}, cls
    return _Schema(cls, code, tuple(out), check, keys)


_SCHEMAS = (
    _schema(Hello, 1, _no_check,
            fingerprint=("f", F.fingerprint()), sampling=("s", F.sampling()),
            variant=("a", F.choice(VARIANTS)), paper_top_k=("k", F.uint(MAX_TOP_K, lo=1)),
            token=("tk", F.text(1024, nullable=True)), client=("c", F.text())),
    _schema(Welcome, 2, _no_check,
            session_id=("s", F.text()), fingerprint=("f", F.fingerprint()),
            model=("m", F.text(MAX_STR)), vocab_size=("n", F.uint(MAX_VOCAB, lo=1)),
            server=("sv", F.text())),
    _schema(Prompt, 3, _check_prompt,
            ids=("i", F.id_list(MAX_PROMPT)), max_new_tokens=("n", F.uint()), fill=("fl", F.flag()),
            shared=("sh", F.uint(MAX_PROMPT))),
    _schema(Prefilled, 4, _no_check,
            committed_len=("c", F.uint()), epoch=("e", F.uint()), prefill_s=("ps", F.seconds()),
            token=("o", F.token_id(nullable=True))),
    _schema(Draft, 5, _check_draft,
            epoch=("e", F.uint()), pos=("p", F.uint()), ids=("i", F.id_list(MAX_BLOCK)),
            dists=("d", F.dist_list(MAX_BLOCK)),
            q_scalar=("q", F.prob_list(MAX_BLOCK, lo_open=True)),
            forced=("f", F.uint(1)), seq=("s", F.uint()),
            wait=("w", F.flag()), root=("r", F.token_id(nullable=True))),
    _schema(Verdict, 6, _check_verdict,
            epoch=("e", F.uint()), pos=("p", F.uint()), accepted=("a", F.uint(MAX_BLOCK)),
            token=("o", F.token_id(nullable=True)), kind=("k", F.choice(VERDICT_KINDS)),
            new_epoch=("n", F.uint()), verify_s=("vs", F.seconds()),
            top_ids=("ti", F.id_list(MAX_TOP_K, nullable=True)),
            top_probs=("tp", F.prob_list(MAX_TOP_K, lo_open=False)), seq=("s", F.uint()),
            fed=("fd", F.uint(MAX_PROMPT + MAX_BLOCK)), branch=("b", F.uint())),
    _schema(Generate, 7, _no_check, max_new_tokens=("n", F.uint())),
    _schema(Tokens, 8, _no_check,
            pos=("p", F.uint()), ids=("i", F.id_list(MAX_PROMPT)), done=("z", F.flag()),
            epoch=("e", F.uint())),
    _schema(Error, 9, _no_check, code=("c", F.text(64)), message=("m", F.text(MAX_STR))),
    _schema(Close, 10, _no_check, reason=("r", F.text(1024))),
)
_BY_CLASS = {s.cls: s for s in _SCHEMAS}
_BY_CODE = {s.code: s for s in _SCHEMAS}
MESSAGE_TYPES: tuple[type, ...] = tuple(s.cls for s in _SCHEMAS)


# ---- encode / decode ----------------------------------------------------------------------


def encode(msg: Message) -> bytes:
    """The frame of msg. Checks it as strictly as decode would (bar vocab_size), so a bad
    message fails here, at the side that made it: CodecError "bad_message" or "too_large"."""
    schema = _BY_CLASS.get(type(msg))
    if schema is None:
        raise CodecError("bad_message", f"not a message type: {type(msg).__name__}")
    body: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": schema.code}
    for f in schema.fields:
        wire = f.codec.enc(getattr(msg, f.name), f"{schema.cls.__name__}.{f.name}")
        if f.required or wire != f.default_wire:
            body[f.key] = wire
    schema.check(msg, None)
    return pack_frame(body)


def decode(
    frame: bytes,
    *,
    vocab_size: int | None = None,
    max_frame: int = MAX_FRAME,
    max_decompressed: int = MAX_DECOMPRESSED,
) -> Message:
    """The message in frame, or CodecError. vocab_size, when given, bounds every token id."""
    if vocab_size is not None and not (type(vocab_size) is int and 1 <= vocab_size <= MAX_VOCAB):
        raise ValueError(f"vocab_size must be an int in [1, {MAX_VOCAB}], got {vocab_size!r}")
    body = unpack_frame(frame, max_frame=max_frame, max_decompressed=max_decompressed)
    if not isinstance(body, dict):
        raise CodecError("bad_message", f"a message is a map, got {type(body).__name__}")
    _check_version(body.get("v"))
    code = body.get("t")
    schema = _BY_CODE.get(code) if type(code) is int else None
    if schema is None:
        raise CodecError("bad_message", f"unknown message type {code!r}")
    name = schema.cls.__name__
    unknown = set(body) - schema.keys - {"v", "t"}
    if unknown:
        raise bad_message(name, f"unknown fields {sorted(map(repr, unknown))}")
    kwargs = {}
    for f in schema.fields:
        if f.key in body:
            kwargs[f.name] = f.codec.dec(body[f.key], f"{name}.{f.name}", vocab_size)
        elif f.required:
            raise bad_message(name, f"missing field {f.name} ({f.key!r})")
    msg = schema.cls(**kwargs)
    schema.check(msg, vocab_size)
    return msg


def _check_version(v: Any) -> None:
    if type(v) is int and v in SUPPORTED_VERSIONS:
        return
    spoken = ", ".join(str(s) for s in SUPPORTED_VERSIONS)
    said = "missing" if v is None else f"{v!r}"[:32]
    raise CodecError(
        "bad_version", f"protocol version {said} not supported; this side speaks {spoken}"
    )


def draft_bytes(msg: Message) -> int:
    """Bytes msg costs on the wire (the frame, tag byte included)."""
    return len(encode(msg))


def error_message(exc: CodecError) -> Error:
    """The Error message that tells the peer why its frame was refused."""
    return Error(code=exc.code, message=exc.message[:MAX_STR])


__all__ = [
    "Close", "Draft", "Error", "Generate", "Hello", "MESSAGE_TYPES", "Message", "Prefilled",
    "Prompt", "Tokens", "VARIANTS", "VERDICT_KINDS", "Verdict", "VerdictKind", "Welcome", "decode",
    "draft_bytes", "encode", "error_message",
]
