"""Who may open a session: the access token, the tokenizer, the sampling settings, and how many
sessions each credential (a token, or the peer address on an open server) may hold at once."""
from __future__ import annotations

import codec
from cloud.errors import SessionError
from cloud.limits import SessionQuota, match_token
from sampling import SamplingParams


class Admission:
    """Checks a Hello and takes a session slot for it; `release` gives the slot back."""

    def __init__(self, tokens: tuple[str, ...], fingerprint: dict, model_name: str,
                 max_sessions: int, max_sessions_per_token: int):
        self.tokens, self.fingerprint, self.model_name = tokens, fingerprint, model_name
        self.max_sessions = max_sessions
        self.quota = SessionQuota(max_sessions_per_token)

    def admit(self, hello: codec.Hello, peer: str, open_sessions: int) -> tuple[str, SamplingParams]:
        """(the quota key it holds now, its sampling settings), or SessionError saying why not.
        Takes the slot synchronously: concurrent hellos cannot overfill."""
        which, params = check_hello(hello, self.tokens, self.fingerprint, self.model_name)
        if open_sessions >= self.max_sessions:
            raise SessionError("overloaded", f"the verifier serves {self.max_sessions} sessions at most")
        # one credential's sessions are capped so that it cannot take every slot
        key = f"token#{which}" if which is not None else f"peer:{peer}"
        if not self.quota.acquire(key):
            raise SessionError("overloaded", f"{self.quota.limit} concurrent sessions per "
                                             f"{'token' if which is not None else 'address'} at most")
        return key, params

    def release(self, key: str) -> None:
        self.quota.release(key)


def check_hello(hello: codec.Hello, tokens: tuple[str, ...], fingerprint: dict,
                model_name: str) -> tuple[int | None, SamplingParams]:
    """(which accepted token it presented, its sampling settings), or SessionError saying why not."""
    which = match_token(hello.token, tokens) if tokens else None
    if tokens and which is None:
        raise SessionError("unauthorized", "missing or wrong access token")
    ok, reason = compatible_fingerprints(hello.fingerprint, fingerprint)
    if not ok:
        raise SessionError("model_mismatch", f"the draft cannot work with target {model_name}: {reason}")
    try:
        params = SamplingParams(
            temperature=float(hello.sampling.get("temperature", 0.0)),
            top_p=float(hello.sampling.get("top_p", 1.0)),
            top_k=int(hello.sampling.get("top_k", 0)),
            seed=hello.sampling.get("seed"),
        ).validate()
    except (TypeError, ValueError) as err:
        raise SessionError("bad_message", f"bad sampling settings: {err}")
    if hello.variant not in codec.VARIANTS:
        raise SessionError("bad_message", f"unknown variant {hello.variant!r}; use 'exact' or 'paper'")
    return which, params


def compatible_fingerprints(draft: dict, target: dict) -> tuple[bool, str]:
    """Whether a draft's tokenizer can work with the target's (see models.fingerprint)."""
    from models.fingerprint import Fingerprint, compatible

    try:
        return compatible(Fingerprint.from_dict(draft), Fingerprint.from_dict(target))
    except (KeyError, TypeError, ValueError) as err:
        return False, f"malformed tokenizer fingerprint: {err}"
