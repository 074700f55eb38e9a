"""Where the accept / recover rule computes: numpy on the host, or torch where the logits are.

The verify step (cloud/verify.py) and the paper variant hand a rule implementation the target's
logit rows [V] (torch tensors on the target's device) and get back small answers: token ids,
p(x) of drafted ids, a top-K. Two implementations, the same definitions (sampling/core.py):
  numpy  sampling.core, the reference: one row at a time, top-p from the head of the order only;
         the fastest on a CPU target (bench/pass_cost.py). On a GPU target its rows would
         cross to the host, O(vocabulary) per row, so it is not the default there.
  torch  sampling.torch_rule on the rows' device: batched over a block's rows; only the sparse q
         goes in and only verdicts (a few ints) come out. The default on a GPU target.
`--rule {auto,numpy,torch}` (ServerConfig.rule) chooses; auto is torch off the CPU, numpy on it.

Randomness: the caller draws the uniforms from the session's RNG and passes them in, with one
convention for both (sampling.core.verify_block_u): a sampled pass over n drafted ids draws n + 1
uniforms, u[j] tests drafted j and u[n] draws the recovered or bonus token; a single token (filled,
cloud-only, Prefilled) draws one. Fed the same uniforms, both give the same tokens up to the
rounding of p: in float64 from the same logits (a CPU target) they agree draw for draw
(tests/test_rule_impl.py); on a GPU the logits themselves differ from a CPU's, and the two agree
in distribution (both are exact), not token for token.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from sampling import SamplingParams, SparseDist, inverse_cdf, prob_of, target_probs, top_k_sparse, verify_block_u
from sampling.torch_rule import pack_sparse, sample_rows, target_probs_rows, verify_blocks

RULE_CHOICES = ("auto", "numpy", "torch")


def resolve_rule(choice: str, device: str | torch.device) -> str:
    """The implementation a server runs: `choice`, or for "auto" torch on a GPU (or any device
    other than the CPU) and numpy on the CPU."""
    if choice not in RULE_CHOICES:
        raise ValueError(f"unknown rule implementation {choice!r}; use one of {', '.join(RULE_CHOICES)}")
    if choice != "auto":
        return choice
    return "numpy" if torch.device(device).type == "cpu" else "torch"


def host_row(row: torch.Tensor) -> np.ndarray:
    """A logit row as a numpy array: no copy on the CPU (float32 logits go in as they are:
    sampling.core computes p in float64 either way)."""
    return row.detach().cpu().numpy()


class _RowProbs(Sequence):
    """target_probs of each row, computed when first read: a rejection at j leaves rows after it
    alone."""

    def __init__(self, rows: Sequence[torch.Tensor], params: SamplingParams, count: int):
        self.rows, self.params, self.count = rows, params, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.count:
            raise IndexError(i)
        return target_probs(host_row(self.rows[i]), self.params)


class NumpyImpl:
    """sampling.core over rows read on the host (the reference)."""

    name = "numpy"

    def argmax(self, rows: Sequence[torch.Tensor]) -> list[int]:
        """Each row's argmax (lowest id on a tie), computed where the row is."""
        return [int(torch.argmax(r)) for r in rows]

    def sample(self, row: torch.Tensor, params: SamplingParams, u: float) -> int:
        """A token from the row's p by inverse CDF with the uniform u (sampled params)."""
        return inverse_cdf(target_probs(host_row(row), params), u)

    def exact(self, drafted: list[int], dists: list[SparseDist], rows: Sequence[torch.Tensor],
              params: SamplingParams, uniforms: np.ndarray, bonus: bool) -> tuple[int, int | None]:
        """The exact rule over a block (sampled params). rows: [n + 1] logits, row n after the
        block; uniforms: [n + 1]. Returns (accepted, token): the recovered token at a rejection,
        the bonus token after a block accepted whole when `bonus`, else None."""
        n = len(drafted)
        outcome, bonus_token = verify_block_u(drafted, dists, _RowProbs(rows, params, n + bonus), uniforms)
        return outcome.accepted, outcome.recovered if outcome.recovered is not None else bonus_token

    def token_probs(self, rows: Sequence[torch.Tensor], tokens: list[int],
                    params: SamplingParams) -> Iterable[float]:
        """p(tokens[j]) at rows[j], row by row as they are read (the paper variant)."""
        for row, x in zip(rows, tokens):
            yield prob_of(target_probs(host_row(row), params), x)

    def top_k(self, row: torch.Tensor, params: SamplingParams, k: int) -> tuple[list[int], list[float]]:
        """The K most likely ids of the row's p, ascending, and their probabilities (the paper
        variant's downlink)."""
        ids, probs = top_k_sparse(target_probs(host_row(row), params), k)
        return ids.tolist(), probs.tolist()


class TorchImpl:
    """sampling.torch_rule on the rows' device, in float64: every answer is a few numbers."""

    name = "torch"

    def argmax(self, rows: Sequence[torch.Tensor]) -> list[int]:
        if not rows:
            return []
        return torch.stack(list(rows)).argmax(-1).tolist()  # one small transfer

    def sample(self, row: torch.Tensor, params: SamplingParams, u: float) -> int:
        u_t = torch.tensor([u], dtype=torch.float64)
        return int(sample_rows(row[None].to(torch.float64), [params], u_t)[0])

    def exact(self, drafted: list[int], dists: list[SparseDist], rows: Sequence[torch.Tensor],
              params: SamplingParams, uniforms: np.ndarray, bonus: bool) -> tuple[int, int | None]:
        n = len(drafted)
        logits = torch.stack(list(rows[:n + 1])).to(torch.float64)[None]  # [1, n + 1, V]
        device = logits.device
        q_ids, q_weights = pack_sparse([dists], n, device)  # [1, n, S] each
        accepted, token, _ = verify_blocks(
            logits, torch.tensor([drafted], dtype=torch.int64).view(1, n), torch.tensor([n]),
            q_ids, q_weights, [params], torch.from_numpy(np.asarray(uniforms, dtype=np.float64))[None],
            want_bonus=torch.tensor([bool(bonus)]))
        accepted, token = torch.stack([accepted[0], token[0]]).tolist()  # the verdict: two ints
        return accepted, (token if token >= 0 else None)

    def token_probs(self, rows: Sequence[torch.Tensor], tokens: list[int],
                    params: SamplingParams) -> Iterator[float]:
        if not tokens:
            return iter(())
        logits = torch.stack(list(rows[:len(tokens)])).to(torch.float64)  # [n, V]
        p = target_probs_rows(logits, [params] * len(tokens))
        vocab = p.shape[-1]
        ids = torch.tensor(tokens, dtype=torch.int64, device=p.device)
        p_x = p.gather(-1, ids.clamp(0, vocab - 1)[:, None])[:, 0]
        return iter(torch.where((ids >= 0) & (ids < vocab), p_x, 0.0).tolist())

    def top_k(self, row: torch.Tensor, params: SamplingParams, k: int) -> tuple[list[int], list[float]]:
        p = target_probs_rows(row[None].to(torch.float64), [params])[0]
        values, ids = torch.topk(p, min(k, p.shape[-1]))
        keep = [(i, v) for i, v in zip(ids.tolist(), values.tolist()) if v > 0]
        keep.sort()
        return [i for i, _ in keep], [v for _, v in keep]


IMPLS = {"numpy": NumpyImpl(), "torch": TorchImpl()}
