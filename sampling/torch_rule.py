"""The exact accept / recover / bonus rule as batched torch operations, on the logits' device.

The cloud's twin of `sampling.core.verify_block_u` (the numpy reference): the same sampling
distribution p (temperature, then top-k, then top-p, ties by ascending token id), the same
accept test and the same use of uniforms, so that fed the same uniforms in float64 on the CPU
both give the same verdicts. Only the sparse q goes in (small tensors) and only per-block
verdicts come out; everything O(vocabulary) stays where the logits are.

Vocabulary as everywhere: a block's drafted tokens are *accepted* up to the first rejection,
where a *recovered* token is drawn from norm(max(0, p - q)); a block accepted whole may get a
*bonus* token drawn from p at the row after it.

Uniform convention, per block b with n_b drafted tokens: uniforms[b, j] tests drafted j
(accepted iff p >= q or u q < p: probability min(1, p/q)); uniforms[b, n_b] draws the recovered
or bonus token by inverse CDF over ascending token ids. Only the edge imports `sampling`; this
module imports torch and is imported by the cloud alone.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from sampling.core import SamplingParams, SparseDist

# verdict kinds, as codec.messages.VerdictKind names them
ACCEPTED, RECOVERED, BONUS = 0, 1, 2
KIND_NAMES = ("accepted", "recovered", "bonus")


def pack_sparse(
    dists: Sequence[Sequence[SparseDist] | None], max_len: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack per-block lists of SparseDist into padded tensors for `verify_blocks`.

    dists: [B] lists of up to max_len SparseDist (None or [] for greedy blocks). Returns
    (q_ids int64 [B, max_len, S], q_weights int64 [B, max_len, S]); padding is id 0, weight 0.
    """
    width = max([len(d.ids) for block in dists if block for d in block], default=1)
    ids = np.zeros((len(dists), max_len, width), dtype=np.int64)
    weights = np.zeros((len(dists), max_len, width), dtype=np.int64)
    for b, block in enumerate(dists):
        for j, d in enumerate(block or []):
            ids[b, j, : len(d.ids)] = d.ids
            weights[b, j, : len(d.ids)] = d.weights
    return torch.from_numpy(ids).to(device), torch.from_numpy(weights).to(device)


def target_probs_rows(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """The sampling distribution p of every row. logits: [R, V]; params: [R].

    Returns [R, V] in float64 for float64 logits, else float32. Greedy rows are one-hot on the
    argmax (lowest id on a tie). Same definition as sampling.core.target_probs: top-k keeps the
    k first of the order (descending p, ascending id); top-p keeps each token whose mass before
    it, within that order, is below top_p times the total (of the top-k set when top-k is on),
    and always the first; the kept mass is renormalised.
    """
    rows, vocab = logits.shape
    device = logits.device
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    greedy = [p.greedy for p in params]
    temperature = torch.tensor([1.0 if g else p.temperature for g, p in zip(greedy, params)],
                               dtype=dtype, device=device)
    probs = torch.softmax(logits.to(dtype) / temperature[:, None], dim=-1)  # [R, V]

    truncating = [not g and (p.top_k > 0 or p.top_p < 1.0) for g, p in zip(greedy, params)]
    if any(truncating):
        top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params],
                             device=device)
        top_p = torch.tensor([p.top_p for p in params], dtype=dtype, device=device)
        with_k = torch.tensor([p.top_k > 0 for p in params], device=device)
        truncated = _truncate(probs, top_k, top_p, with_k, max(p.top_k for p in params))
        rows_truncating = torch.tensor(truncating, device=device)
        probs = torch.where(rows_truncating[:, None], truncated, probs)
    if any(greedy):
        one_hot = torch.zeros_like(probs).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        probs = torch.where(torch.tensor(greedy, device=device)[:, None], one_hot, probs)
    return probs


_HEAD = 1024


def _truncate(probs, top_k, top_p, with_k, largest_k: int) -> torch.Tensor:
    """Top-k / top-p truncation of probs [R, V], renormalised. top_k int64 [R] (V when off),
    top_p [R], with_k bool [R].

    A full sort of 152k-token rows is slow off a GPU, so the rows are truncated from a head: the
    _HEAD (or largest top-k) most likely tokens, reordered by (descending p, ascending id). Its
    first `exact` entries (values strictly above the head's smallest) are exactly the first
    entries of the full order: every token above the smallest is in the head. A row is done
    from the head when its cut falls inside that exact part: top-k within it, or without top-k,
    the running mass there reaching top_p * total with a margin of many ulps (every later token
    then has at least that mass before it and is dropped, as in the full order). Other rows
    (flat distributions, ties across the head's end) take the full stable sort.
    """
    rows, vocab = probs.shape
    head = max(_HEAD, largest_k)
    if 4 * head >= vocab:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        return _scatter_kept(probs, sorted_p, order, top_k, top_p, with_k)[0]
    values, ids = torch.topk(probs, head, dim=-1)  # [R, head], ties in no particular order
    ids, by_id = torch.sort(ids, dim=-1)
    sorted_p, pos = torch.sort(values.gather(-1, by_id), dim=-1, descending=True, stable=True)
    order = ids.gather(-1, pos)
    truncated, cum, total = _scatter_kept(probs, sorted_p, order, top_k.clamp(max=head), top_p,
                                          with_k)
    exact = (sorted_p > sorted_p[:, -1:]).sum(-1)  # [R]
    margin = 16 * torch.finfo(probs.dtype).eps
    reached = cum.gather(-1, (exact - 1).clamp(min=0)[:, None])[:, 0] >= top_p * total + margin
    ok = torch.where(with_k, top_k <= exact, (exact > 0) & reached) | (~with_k & (top_p >= 1))
    if not bool(ok.all()):
        bad = torch.nonzero(~ok)[:, 0]
        sorted_p, order = torch.sort(probs[bad], dim=-1, descending=True, stable=True)
        truncated[bad] = _scatter_kept(probs[bad], sorted_p, order, top_k[bad], top_p[bad],
                                       with_k[bad])[0]
    return truncated


def _scatter_kept(probs, sorted_p, order, top_k, top_p, with_k):
    """The truncation rule on rows given in order (a prefix of the full order, [R, L]): the
    renormalised kept values scattered into [R, V], the running mass [R, L] and the total [R]."""
    length = sorted_p.shape[-1]
    in_top_k = torch.arange(length, device=probs.device)[None, :] < top_k[:, None]
    head = torch.where(in_top_k, sorted_p, 0.0)
    cum = torch.cumsum(head, dim=-1)
    total = torch.where(with_k, head.sum(-1), probs.sum(-1))
    keep = in_top_k & ((cum - head < top_p[:, None] * total[:, None]) | (top_p[:, None] >= 1))
    keep[:, 0] = True
    kept = torch.where(keep, sorted_p, 0.0)
    kept = kept / kept.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, order, kept), cum, total


def inverse_cdf_rows(dist: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token each uniform picks from its row: dist [R, V] (need not sum to one), u [R].
    Returns int64 [R]: the first id whose running mass exceeds u * total, or, on the float edge
    where that is past the end or a zero-mass token, the last token with mass."""
    cum = torch.cumsum(dist, dim=-1)
    pick = torch.searchsorted(cum, (u.to(cum.dtype) * cum[:, -1])[:, None], right=True)[:, 0]
    vocab = dist.shape[-1]
    ids = torch.arange(vocab, device=dist.device)
    last_with_mass = torch.where(dist > 0, ids, -1).amax(-1)
    safe = pick.clamp(max=vocab - 1)
    ok = (pick < vocab) & (dist.gather(-1, safe[:, None])[:, 0] > 0)
    return torch.where(ok, safe, last_with_mass)


@torch.no_grad()
def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams], uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row from its sampling distribution p, by inverse CDF: what
    sampling.core.inverse_cdf(target_probs(row, params), u) gives (argmax for a greedy row).

    logits: [R, V] on their device; params: [R]; uniforms: float64 [R] in [0, 1).
    Returns int64 [R] on the logits' device.
    """
    p = target_probs_rows(logits, params)
    return inverse_cdf_rows(p, uniforms.to(device=p.device, dtype=torch.float64))


@torch.no_grad()
def verify_blocks(
    logits: torch.Tensor,
    drafted: torch.Tensor,
    lengths: torch.Tensor,
    q_ids: torch.Tensor,
    q_weights: torch.Tensor,
    params: Sequence[SamplingParams],
    uniforms: torch.Tensor,
    want_bonus: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact rule over a batch of blocks, one block per session.

    logits:    [B, K+1, V] target logits on their device; row j of block b scores drafted[b, j],
               row lengths[b] is the bonus row (rows past it are padding, ignored)
    drafted:   int64 [B, K] drafted ids (past lengths[b]: padding, ignored)
    lengths:   int64 [B] drafted tokens per block, 0..K
    q_ids, q_weights: int64 [B, K, S] the sparse q each drafted token was sampled from
               (`pack_sparse`); weight 0 is padding; unused for greedy blocks
    params:    [B] each block's SamplingParams (greedy when temperature == 0)
    uniforms:  float64 [B, K+1] in [0, 1): u[b, j] tests drafted j, u[b, lengths[b]] draws the
               recovered or bonus token (unused by greedy blocks)
    want_bonus: bool [B] (default all True): draw a bonus token after a block accepted whole;
               where False such a block's kind is ACCEPTED and its token -1

    Returns (accepted int64 [B], token int64 [B] (-1: none), kind int64 [B]: ACCEPTED /
    RECOVERED / BONUS), on the logits' device. A drafted token outside its q support (q = 0: it
    cannot have been sampled; the server's input checks refuse such drafts) is rejected.
    """
    batch, rows, vocab = logits.shape
    k = rows - 1
    device = logits.device
    drafted, lengths = drafted.to(device), lengths.to(device)
    uniforms = uniforms.to(device=device, dtype=torch.float64)
    valid = torch.arange(k, device=device)[None, :] < lengths[:, None]  # [B, K]
    greedy = torch.tensor([pr.greedy for pr in params], device=device)
    argmax = logits.argmax(-1)  # [B, K+1]
    if all(pr.greedy for pr in params):  # no distribution needed: accept while drafted == argmax
        accepted = torch.cumprod((drafted == argmax[:, :k]) & valid, dim=1).sum(1)
        token = argmax.gather(1, accepted[:, None])[:, 0]
        return _verdicts(accepted, accepted < lengths, token, want_bonus)

    # 1. the target's sampling distribution at every position
    row_params = [p for p in params for _ in range(rows)]
    p = target_probs_rows(logits.reshape(batch * rows, vocab), row_params).view(batch, rows, vocab)

    # 2. accept test per drafted token: u q < p, or p >= q (uses no uniform's value)
    safe_drafted = drafted.clamp(0, vocab - 1)
    p_x = p[:, :k].gather(-1, safe_drafted[..., None])[..., 0]  # [B, K]
    p_x = torch.where((drafted >= 0) & (drafted < vocab), p_x, 0.0)
    q_ids, q_weights = q_ids.to(device), q_weights.to(device)
    total = q_weights.sum(-1).to(torch.float64)  # [B, K]
    hit = torch.where(q_ids == drafted[..., None], q_weights, 0).sum(-1).to(torch.float64)
    q_x = (hit / total.clamp(min=1)).to(p.dtype)
    sampled_ok = (q_x > 0) & ((p_x >= q_x) | (uniforms[:, :k].to(p.dtype) * q_x < p_x))
    accept = torch.where(greedy[:, None], drafted == argmax[:, :k], sampled_ok) & valid
    accepted = torch.cumprod(accept.to(torch.int64), dim=1).sum(1)  # [B]
    rejected = accepted < lengths

    # 3. recovered (from norm(max(0, p - q)) at the first rejection) or bonus (from p after it):
    # both read row `accepted`; one inverse-CDF draw with u[b, lengths[b]]
    p_row = p.gather(1, accepted[:, None, None].expand(batch, 1, vocab))[:, 0]  # [B, V]
    at = accepted.clamp(max=max(k - 1, 0))
    if k > 0:
        row_ids = q_ids.gather(1, at[:, None, None].expand(-1, 1, q_ids.shape[-1]))[:, 0]
        row_w = q_weights.gather(1, at[:, None, None].expand(-1, 1, q_ids.shape[-1]))[:, 0]
        row_total = row_w.sum(-1, keepdim=True).clamp(min=1).to(torch.float64)
        q_row = torch.zeros_like(p_row).scatter_add_(
            -1, row_ids.clamp(0, vocab - 1), (row_w.to(torch.float64) / row_total).to(p.dtype))
        residual = (p_row - q_row).clamp(min=0.0)
        mass = residual.sum(-1, keepdim=True)
        residual = torch.where(mass > 0, residual / torch.where(mass > 0, mass, 1.0), p_row)
        dist = torch.where(rejected[:, None], residual, p_row)
    else:
        dist = p_row
    u_draw = uniforms.gather(1, lengths[:, None])[:, 0]
    sampled_token = inverse_cdf_rows(dist, u_draw)
    greedy_token = argmax.gather(1, accepted[:, None])[:, 0]
    token = torch.where(greedy, greedy_token, sampled_token)
    return _verdicts(accepted, rejected, token, want_bonus)


def _verdicts(accepted, rejected, token, want_bonus):
    if want_bonus is None:
        bonus = torch.ones_like(rejected)
    else:
        bonus = want_bonus.to(device=token.device, dtype=torch.bool)
    kind = torch.where(rejected, RECOVERED, torch.where(bonus, BONUS, ACCEPTED))
    token = torch.where(kind == ACCEPTED, -1, token)
    return accepted, token, kind
