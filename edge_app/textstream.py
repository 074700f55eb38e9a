"""Committed token ids in, text out: the one incremental detokeniser of every streaming surface
(`picospec generate`, `picospec chat`, `picospec demo`, `picospec edge-serve`).

A token can end in the middle of a UTF-8 character (byte-level vocabularies split emoji and CJK
characters over several tokens), and some tokenizers drop or add a leading space depending on what
precedes a token. So text is never decoded token by token: the stream decodes the ids since its
last checkpoint together with the chunk before it (the context) and emits only the difference, and
holds back text that ends in U+FFFD (half a character) until the rest arrives.

With stop strings, text that could be the start of a stop string is held back too, and the text is
cut where the first stop string begins.
"""
from __future__ import annotations

from typing import Callable

PARTIAL = "\ufffd"  # what decode(..., errors="replace") gives for an incomplete character


class TextStream:
    """feed(new_ids) -> the new text that is safe to show; finish() -> the rest.

    decode(ids) -> str must replace undecodable bytes with U+FFFD (errors="replace").
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...] = ()):
        self.decode = decode
        self.stops = tuple(s for s in stops if s)
        self.ids: list[int] = []
        self.text = ""  # complete text decoded so far (cut before a stop string once one is found)
        self.sent = 0  # characters of text handed out by feed() and finish()
        self.stopped = False  # a stop string was found: further ids are ignored
        # ids[:read] are in self.text; ids[context:read] is the chunk decoded again as context
        self._context = 0
        self._read = 0
        self._ahead = 0  # characters after decode(ids[context:read]) already in text (a partial char waits)

    def feed(self, new_ids: list[int]) -> str:
        """Add committed ids; returns the text they complete (may be empty)."""
        if self.stopped:
            return ""
        self.ids += new_ids
        delta = self._decode_new()
        if delta is None or not delta:
            return ""
        self.text += delta
        return self._release(final=False)

    def finish(self) -> str:
        """Everything not handed out yet: a held-back stop prefix, a trailing partial character (as
        U+FFFD: the model really ended there)."""
        if not self.stopped:
            delta = self._decode_new(final=True)
            self.text += delta or ""
        return self._release(final=True)

    def preview(self, speculative: list[int]) -> str:
        """The text that `speculative` ids would add after the text handed out so far (a display of
        not-yet-verified drafts): complete characters only, nothing held back for stops."""
        if self.stopped or not speculative:
            return ""
        known = self.decode(self.ids[self._context:self._read])
        full = self.decode(self.ids[self._context:] + list(speculative))
        tail = self.text[self.sent:] + full[len(known) + self._ahead:] if full.startswith(known) else ""
        return tail.rstrip(PARTIAL)

    # -- internals ---------------------------------------------------------------------------
    def _decode_new(self, final: bool = False) -> str | None:
        """New text of ids[read:], decoded in the context of the chunk before it; None if nothing
        new is visible yet. A trailing partial character is left out and its ids stay unread."""
        if self._read == len(self.ids):
            return ""
        known = self.decode(self.ids[self._context:self._read])
        full = self.decode(self.ids[self._context:])
        seen = len(known) + self._ahead
        if not final and full.endswith(PARTIAL):
            new = full.rstrip(PARTIAL)[seen:]
            self._ahead += len(new)
            return new
        if not final and len(full) <= len(known):
            return None  # nothing visible yet (e.g. ids the decoder drops): wait for more
        self._context, self._read, self._ahead = self._read, len(self.ids), 0
        return full[seen:]

    def _release(self, final: bool) -> str:
        """Hand out text up to a stop string (cutting there), or up to a possible start of one."""
        if self.stops:
            hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[:min(hits)], True
        upto = len(self.text)
        if not final and not self.stopped:
            upto -= holdback(self.text, self.stops)
        delta = self.text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return delta


def find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop string starts in text, if any."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def holdback(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of text could be the start of a stop string (not sent yet)."""
    return max((k for s in stops for k in range(len(s) - 1, 0, -1) if text.endswith(s[:k])), default=0)
