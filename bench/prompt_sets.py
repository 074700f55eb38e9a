"""The benchmark's prompts: the built-in sets (HumanEval, GSM8K, MT-Bench) or any JSONL file.

A row gives its prompt as `prompt` (HumanEval, custom files), `turns` (MT-Bench: the first turn is
used, the benchmark measures single answers) or `question` (GSM8K). Selection is deterministic:
the first N rows of each set, so two runs with the same --limit measure the same prompts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "prompts"

# name -> (file shipped in bench/prompts/, how its text is put to an instruct model)
BUILTIN_SETS: dict[str, tuple[str, str]] = {
    # HumanEval is a function to complete; an instruct model needs to be told so.
    "humaneval": ("humaneval_prompts.jsonl", "Complete the following Python function.\n\n```python\n{text}```"),
    "gsm8k": ("gsm8k_test.jsonl", "{text}"),
    "mt-bench": ("mt_bench_questions.jsonl", "{text}"),
}
_ID_KEYS = ("task_id", "question_id", "id")


class PromptError(ValueError):
    """A prompt set that cannot be read: unknown name, missing file, or a bad row."""


@dataclass(frozen=True)
class BenchPrompt:
    set_name: str  # "humaneval", "gsm8k", "mt-bench", or the custom file's stem
    prompt_id: str  # the row's own id (task_id, question_id) or its line number
    text: str  # what the user turn says (template applied)

    @property
    def label(self) -> str:
        return f"{self.set_name}:{self.prompt_id}"


def row_text(row: object, where: str) -> str:
    """The prompt of one JSONL row: `prompt`, else the first of `turns`, else `question`."""
    if not isinstance(row, dict):
        raise PromptError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if isinstance(row.get("prompt"), str):
        text = row["prompt"]
    elif isinstance(row.get("turns"), list) and row["turns"] and isinstance(row["turns"][0], str):
        text = row["turns"][0]
    elif isinstance(row.get("question"), str):
        text = row["question"]
    else:
        raise PromptError(f"{where}: no prompt: a row needs \"prompt\" (text), \"turns\" (a list of "
                          f"texts; the first is used) or \"question\" (text); found keys {sorted(row)}")
    if not text.strip():
        raise PromptError(f"{where}: the prompt is empty")
    return text


def read_jsonl(path: Path, set_name: str, template: str = "{text}", limit: int | None = None) -> list[BenchPrompt]:
    """The first `limit` prompts of a JSONL file (blank lines skipped)."""
    if not path.is_file():
        raise PromptError(f"prompt file not found: {path}")
    prompts: list[BenchPrompt] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(prompts) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise PromptError(f"{where}: not valid JSON ({err.msg})") from None
            text = row_text(row, where)
            pid = next((str(row[k]) for k in _ID_KEYS if k in row), str(lineno))
            prompts.append(BenchPrompt(set_name, pid, template.format(text=text)))
    if not prompts:
        raise PromptError(f"{path}: no prompts in the file")
    return prompts


def load_prompts(spec: str, limit: int | None = None) -> list[BenchPrompt]:
    """Prompts for a comma-separated list of built-in set names and/or JSONL paths, `limit` per set."""
    if limit is not None and limit < 1:
        raise PromptError("--limit must be at least 1")
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise PromptError("no prompt set given")
    out: list[BenchPrompt] = []
    for name in names:
        if name in BUILTIN_SETS:
            filename, template = BUILTIN_SETS[name]
            out += read_jsonl(DATA_DIR / filename, name, template, limit)
        elif name.endswith(".jsonl") or Path(name).expanduser().exists():
            path = Path(name).expanduser()
            out += read_jsonl(path, path.stem, "{text}", limit)
        else:
            raise PromptError(f"unknown prompt set {name!r}: use {', '.join(BUILTIN_SETS)} or a .jsonl path")
    return out
