"""The batched forward pass (cloud/batch_forward.py): several sessions' rows in one pass, each with its
own cache, give the logits each session's own forward pass gives."""
from __future__ import annotations

import random

import pytest
import torch
from transformers import DynamicCache

from cloud.batch_forward import Segment, batched_forward, cache_lengths, restore_cache, supports_batching
from cloud.kernels import accelerate_linears, load_kernel, restore_linears
from tests.tiny import VOCAB, tiny_model


def model_rows(model, cache, ids):
    """The model's own forward pass: [len(ids), V]."""
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True)
    return out.logits[0].float()


def test_the_tiny_target_qualifies():
    assert supports_batching(tiny_model(0))


def test_mixed_batches_match_each_sessions_own_forward_across_ticks_with_rollback():
    model = tiny_model(0)
    rng = random.Random(5)
    n_sessions = 5
    ours = [DynamicCache(config=model.config) for _ in range(n_sessions)]
    theirs = [DynamicCache(config=model.config) for _ in range(n_sessions)]
    worst = 0.0
    for tick in range(8):
        segments, feeds = [], []
        for i in range(n_sessions):
            if tick > 0 and rng.random() < 0.2:
                continue  # not every session has work every tick
            # tick 0: a prefill of different lengths; later: k = 1..8 rows, or a prefill chunk
            k = rng.randint(3, 40) if tick == 0 else rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 20])
            ids = [rng.randrange(VOCAB) for _ in range(k)]
            segments.append(Segment(ours[i], ids, all_rows=rng.random() < 0.7))
            feeds.append((i, ids))
        got = batched_forward(model, segments)
        for seg, (i, ids), rows in zip(segments, feeds, got):
            want = model_rows(model, theirs[i], ids)
            if not seg.all_rows:
                want = want[-1:]
            assert rows.shape == want.shape
            worst = max(worst, float((rows - want).abs().max()))
            assert ours[i].get_seq_length() == theirs[i].get_seq_length()
        # rollback between ticks, as a rejected draft does
        for i in range(n_sessions):
            drop = rng.randint(0, 3)
            n = ours[i].get_seq_length()
            if 0 < drop < n:
                ours[i].crop(-drop)
                theirs[i].crop(-drop)
    assert worst < 1e-5, worst


@pytest.mark.skipif(not load_kernel()[0], reason="no row-streaming kernel on this CPU")
def test_with_the_row_streaming_kernel_a_sessions_rows_are_the_targets_own_bit_for_bit():
    model = tiny_model(0)
    accelerate_linears(model, enabled=True)
    try:
        rng = random.Random(1)
        prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(2, 30))] for _ in range(6)]
        blocks = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 8))] for _ in range(6)]
        alone = []
        for p, b in zip(prompts, blocks):
            cache = DynamicCache(config=model.config)
            batched_forward(model, [Segment(cache, p, all_rows=False)])
            alone.append(batched_forward(model, [Segment(cache, b)])[0])
        caches = [DynamicCache(config=model.config) for _ in prompts]
        batched_forward(model, [Segment(c, p, all_rows=False) for c, p in zip(caches, prompts)])
        together = batched_forward(model, [Segment(c, b) for c, b in zip(caches, blocks)])
        for a, t in zip(alone, together):
            assert torch.equal(a, t)
        # and both are bit for bit the model's own forward pass: the target alone
        for p, b, t in zip(prompts, blocks, together):
            cache = DynamicCache(config=model.config)
            model_rows(model, cache, p)
            assert torch.equal(t, model_rows(model, cache, b))
    finally:
        restore_linears(model)


def test_a_failed_pass_can_be_undone_layer_by_layer():
    model = tiny_model(0)
    cache = DynamicCache(config=model.config)
    batched_forward(model, [Segment(cache, [1, 2, 3, 4])])
    before = cache_lengths(cache)
    cache.layers[0].update(torch.zeros(1, 1, 2, 16), torch.zeros(1, 1, 2, 16))  # half a pass
    assert cache_lengths(cache) == [6, 4]
    restore_cache(cache, before)
    assert cache_lengths(cache) == [4, 4]
    fresh = DynamicCache(config=model.config)
    model_rows(model, fresh, [1, 2, 3, 4])
    assert torch.allclose(batched_forward(model, [Segment(cache, [5])])[0], model_rows(model, fresh, [5]), atol=1e-5)


def test_empty_segments_are_refused():
    model = tiny_model(0)
    with pytest.raises(ValueError):
        batched_forward(model, [Segment(DynamicCache(config=model.config), [])])
