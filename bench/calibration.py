"""How well the draft model's confidence predicts what the target keeps (greedy).

    python -m bench.calibration --bench-json bench/results/bench.json --prompts humaneval,gsm8k,mt-bench --limit 2

For every cloud-only answer in a benchmark JSON (the target's own greedy tokens), the draft model
reads prompt + answer in one pass and, at each answer position, gives its probability of its own
top token; the table buckets those probabilities and shows how often the top token was the
target's (what a greedy verify pass keeps), and, where it was not, how often the target's token
was the draft's runner-up (what a branch after the runner-up needs). This is what the pipeline's
`--cut-below` and the branches rest on. `--prompts` / `--limit` must name the run's prompts (the
JSON keeps the answers' ids, not the prompts').
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from sampling import softmax

BUCKETS = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0001)


def position_rows(logits: np.ndarray, answer: list[int]) -> list[tuple[float, int]]:
    """logits: [len(answer), V], row i the draft's next-token logits before answer[i]. Returns
    (the draft's top probability, the rank of answer[i] among the draft's top 3, 3 if lower)."""
    out = []
    for row, token in zip(logits, answer):
        p = softmax(row)
        top3 = np.argsort(-p)[:3]
        rank = int(np.flatnonzero(top3 == token)[0]) if token in top3 else 3
        out.append((float(p[top3[0]]), rank))
    return out


def summarize(rows: list[tuple[str, float, int]]) -> dict:
    """rows: (category, top probability, rank of the target's token). Returns the buckets and the
    per-category numbers as a JSON-able dict."""
    buckets = []
    for lo, hi in zip(BUCKETS, BUCKETS[1:]):
        ranks = [r for _, p, r in rows if lo <= p < hi]
        buckets.append({"from": lo, "to": min(hi, 1.0), "positions": len(ranks),
                        "kept": (sum(r == 0 for r in ranks) / len(ranks)) if ranks else None})
    categories = {}
    for cat in sorted({c for c, _, _ in rows}):
        mine = [(p, r) for c, p, r in rows if c == cat]
        missed = [r for _, r in mine if r != 0]
        categories[cat] = {
            "positions": len(mine),
            "kept": sum(r == 0 for _, r in mine) / len(mine),
            "unsure_share": sum(p < 0.5 for p, _ in mine) / len(mine),
            "missed": len(missed),
            "runner_up_when_missed": (sum(r == 1 for r in missed) / len(missed)) if missed else None,
            "third_when_missed": (sum(r == 2 for r in missed) / len(missed)) if missed else None,
        }
    return {"buckets": buckets, "categories": categories}


def format_table(summary: dict) -> str:
    lines = ["draft's top probability  positions  target kept it"]
    for b in summary["buckets"]:
        kept = "-" if b["kept"] is None else f"{b['kept']:.2f}"
        lines.append(f"  {b['from']:.2f}-{b['to']:.2f}            {b['positions']:9d}  {kept:>14}")
    lines.append("category   positions  kept  p<0.5  missed  runner-up|missed  third|missed")
    for cat, c in summary["categories"].items():
        ru = "-" if c["runner_up_when_missed"] is None else f"{c['runner_up_when_missed']:.2f}"
        th = "-" if c["third_when_missed"] is None else f"{c['third_when_missed']:.2f}"
        lines.append(f"{cat:10s} {c['positions']:9d}  {c['kept']:.2f}  {c['unsure_share']:.2f}  {c['missed']:6d}"
                     f"  {ru:>16}  {th:>12}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.calibration", description=__doc__.split("\n")[0])
    p.add_argument("--bench-json", required=True, help="a `picospec bench --json` file with cloud-only answers")
    p.add_argument("--prompts", default="humaneval,gsm8k,mt-bench", help="the run's --prompts")
    p.add_argument("--limit", type=int, default=4, help="the run's --limit")
    p.add_argument("--draft", default=None, help="draft GGUF (default: the default draft)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the summary here")
    args = p.parse_args(argv)

    import llama_cpp

    from bench.prompt_sets import load_prompts
    from edge_app.template import chat_ids
    from models.resolve import resolve_draft

    run = json.loads(Path(args.bench_json).read_text())
    answers = {}
    for rec in run.get("per_prompt", []):
        if rec["mode"] == "cloud":
            answers.setdefault(rec["prompt"], rec["token_ids"])
    if not answers:
        print("no cloud-only answers in that JSON (run the bench with the cloud mode)", file=sys.stderr)
        return 2
    path = str(resolve_draft(args.draft).path)
    llm = llama_cpp.Llama(model_path=path, n_ctx=4096, logits_all=True, n_threads=args.threads or 2,
                          verbose=False)
    template = llm.metadata.get("tokenizer.chat_template")
    rows = []
    for prompt in load_prompts(args.prompts, args.limit):
        answer = answers.get(prompt.label)
        if not answer:
            continue
        ids = chat_ids([{"role": "user", "content": prompt.text}], template,
                       lambda text, add_bos: llm.tokenize(text.encode(), add_bos=add_bos, special=True))
        llm.reset()
        llm.eval(ids + answer)
        logits = np.asarray(llm.scores[len(ids) - 1:len(ids) + len(answer) - 1])
        rows += [(prompt.set_name, p, r) for p, r in position_rows(logits, answer)]
    if not rows:
        print("none of the JSON's answers belongs to these --prompts / --limit", file=sys.stderr)
        return 2
    summary = summarize(rows)
    print(format_table(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
        print(f"  wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
