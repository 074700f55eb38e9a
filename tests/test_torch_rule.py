"""The batched torch rule (sampling/torch_rule.py) against the numpy reference (sampling/core.py).

What a user would notice if this broke: a cloud on a GPU that commits other tokens than the
reference rule would, or sampled output that no longer follows the target's distribution.
Both are fed the same uniforms in float64 on the CPU and must give the same verdicts.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sampling import (  # noqa: E402
    SamplingParams,
    draft_dist,
    sample_sparse,
    target_probs,
    verify_block_greedy,
    verify_block_u,
)
from sampling.torch_rule import (  # noqa: E402
    ACCEPTED,
    BONUS,
    RECOVERED,
    pack_sparse,
    verify_blocks,
)
from tests.test_sampling import assert_matches  # noqa: E402

SETTINGS = [
    SamplingParams(0.0), SamplingParams(0.7, top_p=0.9), SamplingParams(0.8, top_p=0.95),
    SamplingParams(1.0), SamplingParams(1.0, top_k=5), SamplingParams(1.0, top_k=50, top_p=0.95),
    SamplingParams(1.5, top_p=0.83), SamplingParams(0.5, top_k=1), SamplingParams(1.0, top_k=3,
                                                                                 top_p=0.6),
]


def make_batch(rng: np.random.Generator, batch: int, k: int, vocab: int, params_pool):
    """Random blocks: target logits [B, K+1, V], drafted ids sampled from the draft's q."""
    logits = rng.normal(size=(batch, k + 1, vocab)) * rng.uniform(1.0, 4.0, size=(batch, 1, 1))
    lengths = rng.integers(0, k + 1, size=batch) if k > 1 else np.full(batch, k)
    params = [params_pool[int(rng.integers(len(params_pool)))] for _ in range(batch)]
    drafted = np.zeros((batch, k), dtype=np.int64)
    dists = []
    for b in range(batch):
        noise = rng.uniform(0.2, 2.0)
        block = []
        for j in range(int(lengths[b])):
            q = draft_dist(logits[b, j] + rng.normal(size=vocab) * noise, params[b])
            drafted[b, j] = sample_sparse(q, rng)
            block.append(q)
        dists.append(block)
    return logits, drafted, lengths, params, dists


def reference(logits, drafted, lengths, params, dists, uniforms):
    """Per block (accepted, token or -1, kind) from sampling.core."""
    out = []
    for b, prm in enumerate(params):
        n = int(lengths[b])
        ids = [int(t) for t in drafted[b, :n]]
        if prm.greedy:
            best = [int(np.argmax(row)) for row in logits[b, : n + 1]]
            v = verify_block_greedy(ids, best[:n])
            bonus = best[n] if v.recovered is None else None
        else:
            rows = [target_probs(row, prm) for row in logits[b, : n + 1]]
            v, bonus = verify_block_u(ids, dists[b], rows, uniforms[b])
        if v.recovered is not None:
            out.append((v.accepted, v.recovered, RECOVERED))
        else:
            out.append((v.accepted, bonus, BONUS))
    return out


def run_torch(logits, drafted, lengths, params, dists, uniforms):
    k = drafted.shape[1]
    q_ids, q_weights = pack_sparse(dists, k)
    accepted, token, kind = verify_blocks(
        torch.from_numpy(logits), torch.from_numpy(drafted), torch.from_numpy(lengths),
        q_ids, q_weights, params, torch.from_numpy(uniforms))
    return list(zip(accepted.tolist(), token.tolist(), kind.tolist()))


@pytest.mark.parametrize("vocab", [2, 5, 17, 300])
def test_torch_verdicts_equal_the_numpy_reference_on_small_vocabularies(vocab):
    rng = np.random.default_rng(vocab)
    kinds = set()
    for _ in range(60):
        batch, k = int(rng.integers(1, 17)), int(rng.integers(1, 9))
        case = make_batch(rng, batch, k, vocab, SETTINGS)
        uniforms = rng.random((batch, k + 1))
        want = reference(*case, uniforms)
        assert run_torch(*case, uniforms) == want
        kinds |= {kind for _, _, kind in want}
    assert kinds == {RECOVERED, BONUS}  # both outcomes were exercised


def test_torch_verdicts_equal_the_numpy_reference_on_a_152k_vocabulary():
    rng = np.random.default_rng(152)
    for batch, k in [(1, 8), (3, 4), (2, 1)]:
        case = make_batch(rng, batch, k, 151_936, SETTINGS)
        uniforms = rng.random((batch, k + 1))
        assert run_torch(*case, uniforms) == reference(*case, uniforms)


def test_torch_verdicts_equal_the_numpy_reference_on_tied_logits():
    """Coarse logits (many exact ties): top-k must keep the lowest ids among ties."""
    rng = np.random.default_rng(3)
    pool = [SamplingParams(1.0, top_k=2), SamplingParams(0.9, top_k=4), SamplingParams(0.0),
            SamplingParams(1.0, top_k=3, top_p=0.77)]
    for _ in range(40):
        batch, k, vocab = int(rng.integers(1, 9)), int(rng.integers(1, 6)), 12
        logits, drafted, lengths, params, dists = make_batch(rng, batch, k, vocab, pool)
        logits = np.round(logits)  # ties; q comes from the unrounded rows, as a real draft's would
        uniforms = rng.random((batch, k + 1))
        case = (logits, drafted, lengths, params, dists)
        assert run_torch(*case, uniforms) == reference(*case, uniforms)


def test_want_bonus_false_gives_accepted_without_a_token():
    rng = np.random.default_rng(4)
    logits, drafted, lengths, params, dists = make_batch(rng, 4, 3, 10, [SamplingParams(0.0)])
    drafted = logits.argmax(-1)[:, :3]  # the target's own tokens: accepted whole
    lengths = np.full(4, 3)
    q_ids, q_weights = pack_sparse([None] * 4, 3)
    accepted, token, kind = verify_blocks(
        torch.from_numpy(logits), torch.from_numpy(drafted), torch.from_numpy(lengths), q_ids,
        q_weights, params, torch.zeros(4, 4, dtype=torch.float64),
        want_bonus=torch.tensor([True, False, True, False]))
    assert accepted.tolist() == [3, 3, 3, 3]
    assert kind.tolist() == [BONUS, ACCEPTED, BONUS, ACCEPTED]
    assert token.tolist()[1] == token.tolist()[3] == -1
    assert token.tolist()[0] == int(logits[0, 3].argmax())


def test_a_drafted_token_outside_its_q_support_is_rejected():
    logits = np.zeros((1, 2, 4))
    logits[0, 0, 2] = 5.0
    q_ids, q_weights = pack_sparse([[draft_dist(np.array([0.0, 9.0, 0.0, 0.0]),
                                                SamplingParams(1.0, top_k=1))]], 1)
    accepted, token, kind = verify_blocks(
        torch.from_numpy(logits), torch.tensor([[3]]), torch.tensor([1]), q_ids, q_weights,
        [SamplingParams(1.0)], torch.full((1, 2), 0.5, dtype=torch.float64))
    assert (accepted.item(), kind.item()) == (0, RECOVERED)


@pytest.fixture
def one_thread():
    """Tiny tensors: thread pools only add overhead (and the CPU is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("batch,n", [(1, 5_000), (8, 20_000), (512, 102_400)])
def test_torch_rule_output_follows_the_target_distribution(batch, n, one_thread):
    """Committed token at a one-token block, and the bonus token after it, follow p, whatever
    the batch size (the 512-block batches give the 100k-sample sharpness cheaply)."""
    rng = np.random.default_rng(batch)
    params = SamplingParams(1.0, top_k=6, top_p=0.97)
    target = np.array([2.0, 1.5, 0.3, 0.0, -0.5, 1.0, -3.0, 0.7])
    q = draft_dist(np.array([0.0, 2.5, 1.0, -1.0, 0.5, 0.2, 1.0, -2.0]), params)
    p = target_probs(target, params)
    logits = torch.from_numpy(np.broadcast_to(target, (batch, 2, 8)).copy())
    q_ids, q_weights = pack_sparse([[q]] * batch, 1)
    lengths = torch.ones(batch, dtype=torch.int64)
    committed = np.zeros(8, dtype=np.int64)
    bonus = np.zeros(8, dtype=np.int64)
    for _ in range(n // batch):
        drafted = torch.tensor([[sample_sparse(q, rng)] for _ in range(batch)])
        accepted, token, kind = verify_blocks(logits, drafted, lengths, q_ids, q_weights,
                                              [params] * batch,
                                              torch.from_numpy(rng.random((batch, 2))))
        first = torch.where(accepted == 1, drafted[:, 0], token)
        np.add.at(committed, first.numpy(), 1)
        np.add.at(bonus, token[kind == BONUS].numpy(), 1)
    assert_matches(committed, p, f"torch rule, batch {batch}")
    assert_matches(bonus, p, f"torch rule bonus, batch {batch}")
