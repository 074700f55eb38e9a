"""Streaming text to a terminal: committed text as it grows, the speculative tail dim after it.

Pure helpers (column arithmetic, sanitising model output) and `StreamView`, the on_commit callback
that `picospec chat` and `picospec demo` hand to the pipeline.
"""
from __future__ import annotations

import shutil
import unicodedata
from typing import Callable

from edge_app.textstream import TextStream

DIM, RESET, ERASE_EOL = "\x1b[2m", "\x1b[0m", "\x1b[K"


def char_width(ch: str) -> int:
    """Terminal columns a character takes (wide East Asian 2, combining and controls 0)."""
    if unicodedata.combining(ch) or unicodedata.category(ch) in ("Cc", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def display_width(text: str) -> int:
    return sum(char_width(c) for c in text)


def sanitize(text: str) -> str:
    """Drop control characters but newline and tab: model output must never drive the terminal."""
    return "".join(c for c in text if c in "\n\t" or unicodedata.category(c) != "Cc")


def advance_column(col: int, text: str, width: int) -> int:
    """The cursor column after writing text from col (col == width: the line is full, wrap pending)."""
    for ch in text:
        if ch == "\n":
            col = 0
        elif ch == "\t":
            col = min(width - 1, (col // 8 + 1) * 8)
        else:
            w = char_width(ch)
            if w and col + w > width:
                col = 0
            col += w
    return col


def fit_columns(text: str, columns: int) -> str:
    """The first line of text, tabs as spaces, cut to fit in `columns` terminal columns."""
    line = text.split("\n", 1)[0].replace("\t", " ")
    out, used = [], 0
    for ch in line:
        w = char_width(ch)
        if used + w > columns:
            break
        out.append(ch)
        used += w
    return "".join(out)


def fancy_terminal(stdin, stdout, environ) -> bool:
    """ANSI and speculative text only on a real terminal that understands them."""
    return stdin.isatty() and stdout.isatty() and environ.get("TERM", "dumb") != "dumb"


class StreamView:
    """The on_commit callback: prints committed text as it grows; with ansi=True the speculative
    tail follows dim on the same line and the cursor goes back to the end of the committed text,
    so the next delta simply overwrites it (after an erase-to-end-of-line)."""

    def __init__(self, decode: Callable[[list[int]], str], write: Callable[[str], None], ansi: bool,
                 terminal: bool, columns: Callable[[], int] = lambda: shutil.get_terminal_size().columns):
        self.stream = TextStream(decode)
        self.write, self.ansi, self.terminal, self.columns = write, ansi, terminal, columns
        self.col = 0
        self.spec_cols = 0  # columns of speculative text right of the cursor

    def __call__(self, new_ids: list[int], speculative: list[int]) -> None:
        out = self._erase_speculative() + self._committed(self.stream.feed(new_ids))
        if self.ansi and speculative:
            out += self._speculative(self.stream.preview(speculative))
        if out:
            self.write(out)

    def finish(self) -> str:
        """Write whatever is left, clear the speculative tail; the committed answer's text."""
        out = self._erase_speculative() + self._committed(self.stream.finish())
        if out:
            self.write(out)
        return self.stream.text

    def interject(self, line: str) -> None:
        """A line of its own (a notice) in the middle of the answer; the answer goes on below it."""
        self.write(self._erase_speculative() + ("\n" if self.col else "") + line + "\n")
        self.col = 0

    def _committed(self, delta: str) -> str:
        if self.terminal:
            delta = sanitize(delta)
        self.col = advance_column(self.col, delta, self.columns())
        return delta

    def _speculative(self, text: str) -> str:
        line = fit_columns(sanitize(text), self.columns() - self.col - 1)
        self.spec_cols = display_width(line)
        return f"{DIM}{line}{RESET}\x1b[{self.spec_cols}D" if self.spec_cols else ""

    def _erase_speculative(self) -> str:
        if not self.spec_cols:
            return ""
        self.spec_cols = 0
        return ERASE_EOL
