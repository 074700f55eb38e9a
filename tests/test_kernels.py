"""The CPU row-streaming linear kernel (cloud/kernels.py) against torch's stock kernel.

What a user would notice: a verify pass of k tokens gives, row for row, what k one-token passes give
(bit for bit, so greedy speculation equals the target alone), the logits stay within float32
rounding of torch's stock kernel, and PICOSPEC_FAST_LINEAR=0 turns it off. Speed is measured by
bench/verify_curve.py, never here.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from cloud import kernels
from cloud.engine import EngineConfig, TargetEngine
from cloud.kernels import RowStreamLinear, accelerate_linears, restore_linears

AVAILABLE, WHY = kernels.load_kernel()
needs_kernel = pytest.mark.skipif(not AVAILABLE, reason=f"fast path unavailable here: {WHY}")


def tiny_qwen(seed: int = 0) -> Qwen2ForCausalLM:
    """Qwen2 geometry in miniature: biased q/k/v, GQA, an untied lm_head; K = 64 and 172 (not a
    multiple of 8, so the kernel's k tail runs)."""
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # spread the logits: greedy choices are not near-ties
    return model


def engines(seed: int = 0) -> tuple[TargetEngine, TargetEngine]:
    """(stock, fast): two engines over identical weights."""
    stock, fast = tiny_qwen(seed), tiny_qwen(seed)
    description = accelerate_linears(fast, enabled=True)
    assert "linear layers" in description, description
    return TargetEngine(stock), TargetEngine(fast, kernels=description)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 13, 40])
@pytest.mark.parametrize("n, k", [(1000, 64), (172, 64), (64, 172), (7, 9)])
def test_kernel_matches_float64_like_stock(rows, n, k):
    torch.manual_seed(rows * 100 + n)
    x, w, b = torch.randn(rows, k), torch.randn(n, k), torch.randn(n)
    exact = (x.double() @ w.double().t() + b.double())
    fast = kernels.rowstream_linear(x, w, b)
    stock = F.linear(x, w, b)
    assert fast.shape == stock.shape == (rows, n)
    # float32 rounding only, like the stock kernel's
    bound = 1e-5 * (x.abs().double() @ w.abs().double().t() + b.abs().double()).max().item()
    assert (fast.double() - exact).abs().max().item() <= bound
    assert (stock.double() - exact).abs().max().item() <= bound


@needs_kernel
def test_each_row_is_bit_for_bit_the_one_row_result():
    torch.manual_seed(0)
    x, w = torch.randn(24, 1536), torch.randn(300, 1536)
    full = kernels.rowstream_linear(x, w)
    for rows in (1, 2, 3, 4, 7, 8, 16):
        assert torch.equal(kernels.rowstream_linear(x[:rows], w), full[:rows])
    for i in range(24):
        assert torch.equal(kernels.rowstream_linear(x[i:i + 1], w), full[i:i + 1])
    # and with more threads (the weight rows are split between them; the arithmetic is not)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.equal(kernels.rowstream_linear(x, w), full)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
@pytest.mark.parametrize("n, k", [(301, 1000), (13, 1536), (5, 9), (8, 4)])
def test_every_row_count_and_tail_is_row_independent(n, k):
    """Every row count up to 17 (the 4-row groups and their 1-3 row tails), weight-row tails (N not
    a multiple of the tile), k tails (K not a multiple of 8, or under 8) and several k blocks: each
    row of a k-row product is bit for bit the one-row product, with and without a bias."""
    torch.manual_seed(n + k)
    x, w, b = torch.randn(17, k), torch.randn(n, k), torch.randn(n)
    ones = [kernels.rowstream_linear(x[i:i + 1], w, b) for i in range(17)]
    ones_nobias = [kernels.rowstream_linear(x[i:i + 1], w) for i in range(17)]
    for rows in range(1, 18):
        assert torch.equal(kernels.rowstream_linear(x[:rows], w, b), torch.cat(ones[:rows]))
        assert torch.equal(kernels.rowstream_linear(x[17 - rows:], w), torch.cat(ones_nobias[17 - rows:]))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.equal(kernels.rowstream_linear(x, w, b), torch.cat(ones))
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_batched_and_3d_inputs_keep_their_shape():
    lin = nn.Linear(300, 100)  # two weight blocks and two k slices: the packed layout matters
    stock_out = lin(torch.ones(2, 3, 300))
    accelerate_linears(lin, enabled=True)
    with torch.inference_mode():
        out = lin(torch.ones(2, 3, 300))
    assert out.shape == (2, 3, 100)
    assert torch.allclose(out, stock_out, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("k", [1, 2, 8])
def test_verify_pass_logits_match_the_stock_path(k):
    stock, fast = engines()
    context = torch.randint(0, 1000, (30,), generator=torch.Generator().manual_seed(1)).tolist()
    block = torch.randint(0, 1000, (k,), generator=torch.Generator().manual_seed(2)).tolist()
    for e in (stock, fast):
        e.prefill(context)
    rows_stock, rows_fast = stock.forward(block), fast.forward(block)
    assert rows_fast.shape == rows_stock.shape == (k, 1000)
    assert rows_fast.dtype == torch.float32 and rows_fast.device.type == "cpu"
    assert (rows_fast - rows_stock).abs().max().item() < 1e-4
    assert torch.equal(rows_fast.argmax(-1), rows_stock.argmax(-1))


@needs_kernel
def test_verify_rows_equal_one_token_passes_through_rollback():
    _, fast = engines()
    context, block = list(range(10, 40)), [5, 17, 923, 4, 4, 600, 31, 2]
    fast.prefill(context)
    start = fast.cache_len
    rows = fast.forward(block)  # one pass of 8
    fast.rollback(start)
    assert fast.cache_len == start
    one_by_one = torch.stack([fast.forward([t])[-1] for t in block])  # eight passes of 1
    assert fast.cache_len == start + len(block)
    assert (rows - one_by_one).abs().max().item() < 1e-5
    assert torch.equal(rows.argmax(-1), one_by_one.argmax(-1))
    # roll back into the block and go on: the same rows again
    fast.rollback(start + 3)
    again = fast.forward(block[3:])
    assert (again - rows[3:]).abs().max().item() < 1e-5


@needs_kernel
def test_greedy_continuation_equals_the_stock_one():
    stock, fast = engines(seed=3)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8]

    def greedy(engine: TargetEngine, n: int) -> list[int]:
        engine.reset()
        logits, out = engine.prefill(prompt), []
        while len(out) < n:
            out.append(int(torch.argmax(logits)))
            logits = engine.forward(out[-1:])[-1]
        return out

    assert greedy(fast, 24) == greedy(stock, 24)


def test_prefill_computes_the_last_row_only():
    stock, _ = engines() if AVAILABLE else (TargetEngine(tiny_qwen()), None)
    ids = list(range(1, 21))
    last = stock.prefill(ids, chunk=8)
    assert last.shape == (1000,)
    probe = stock.fork()
    rows = probe.forward(ids)
    assert rows.shape == (20, 1000)
    assert (rows[-1] - last).abs().max().item() < 1e-4
    assert probe.forward([3], last_only=True).shape == (1, 1000)


def test_opt_out_keeps_stock_linears(monkeypatch):
    model = tiny_qwen()
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    description = accelerate_linears(model)
    assert "off" in description
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    assert "off" in accelerate_linears(model, enabled=False)


def test_load_respects_the_config_switch(monkeypatch):
    import models.target_cache as target_cache

    monkeypatch.setattr(target_cache, "load_target", lambda spec, dtype, device: (tiny_qwen(), None))
    off = TargetEngine.load(None, EngineConfig(dtype="float32", device="cpu", fast_linear=False))
    assert not any(isinstance(m, RowStreamLinear) for m in off.model.modules())
    assert "off" in off.kernels
    on = TargetEngine.load(None, EngineConfig(dtype="float32", device="cpu", fast_linear=True))
    assert any(isinstance(m, RowStreamLinear) for m in on.model.modules()) == AVAILABLE
    assert on.fork().kernels == on.kernels


def test_not_float32_or_not_cpu_is_a_no_op():
    model = tiny_qwen().to(torch.bfloat16)
    assert "bfloat16" in accelerate_linears(model, enabled=True)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))


@needs_kernel
def test_restore_gives_back_stock_linears():
    model = tiny_qwen()
    accelerate_linears(model, enabled=True)
    n = sum(isinstance(m, RowStreamLinear) for m in model.modules())
    assert n == 2 * 7 + 1  # q k v o gate up down per layer, and the lm_head
    packed = model.lm_head.weight.clone()
    assert accelerate_linears(model, enabled=True).endswith(f"{n} of {n} linear layers")  # not packed twice
    assert torch.equal(model.lm_head.weight, packed)
    assert restore_linears(model) == n
    assert not any(isinstance(m, RowStreamLinear) for m in model.modules())


@needs_kernel
def test_training_through_packed_weights_is_refused_clearly():
    lin = nn.Linear(16, 4)
    accelerate_linears(lin, enabled=True)
    x = torch.randn(3, 16, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference"):
        lin(x)
    with torch.no_grad():
        assert lin(x).shape == (3, 4)
    restore_linears(lin)
    lin(x).sum().backward()  # back in torch's layout, it trains
    assert x.grad is not None and lin.weight.grad is not None


@needs_kernel
def test_long_inputs_stay_row_independent():
    """A long prefill chunk (more rows than one run of the kernel) is run in pieces: every row is
    still bit for bit its one-row result, so a prompt's logits do not depend on the chunk size."""
    lin = nn.Linear(300, 200)
    plain = lin.weight.detach().clone()
    accelerate_linears(lin, enabled=True)
    x = torch.randn(150, 300)
    with torch.inference_mode():
        full = lin(x)
        assert torch.equal(full, torch.cat([lin(x[i:i + 1]) for i in range(150)]))
        assert torch.equal(full[:70], lin(x[:70]))
    assert torch.allclose(full, F.linear(x, plain, lin.bias), atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("n, k", [(1, 1), (95, 255), (96, 256), (97, 257), (300, 1000), (200, 513)])
def test_packing_round_trips_and_reads_rows(n, k):
    """Every block and k-slice boundary: pack then unpack (in place and as copies) gives the weight
    back exactly, and packed_rows reads any rows of it."""
    w = torch.randn(n, k)
    packed = kernels.pack(w)
    assert not torch.equal(packed, w) or (n <= 96 and k <= 256)
    assert torch.equal(kernels.unpacked(packed), w)
    ids = torch.tensor([[0, n - 1], [n // 2, 0]])
    assert torch.equal(torch.ops.picospec_kernels.packed_rows(packed, ids), w[ids])
    same = w.clone()
    torch.ops.picospec_kernels.pack_(same)
    assert torch.equal(same, packed)
    torch.ops.picospec_kernels.unpack_(same)
    assert torch.equal(same, w)


@needs_kernel
def test_tied_embeddings_read_the_packed_weight():
    """A model whose input embedding is its output layer's weight (Qwen2.5 1.5B's shape): after
    packing, the embedding still reads the right rows, greedy output equals the stock model's,
    state_dict() is in torch's layout, and restore_linears gives the weights back bit for bit."""
    torch.manual_seed(3)
    config = Qwen2Config(vocab_size=500, hidden_size=320, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)  # 320 features: two k slices a row
    stock = Qwen2ForCausalLM(config).eval()
    fast = Qwen2ForCausalLM(config).eval()
    fast.load_state_dict(stock.state_dict())
    assert fast.lm_head.weight is fast.model.embed_tokens.weight
    before = {name: t.clone() for name, t in fast.state_dict().items()}
    accelerate_linears(fast, enabled=True)
    assert isinstance(fast.model.embed_tokens, kernels.PackedEmbedding)
    assert not torch.equal(fast.lm_head.weight, before["lm_head.weight"])  # packed in place
    assert all(torch.equal(t, before[name]) for name, t in fast.state_dict().items())
    a, b = TargetEngine(stock), TargetEngine(fast)
    prompt = torch.randint(0, 500, (20,), generator=torch.Generator().manual_seed(4)).tolist()
    outs = []
    for e in (a, b):
        logits, out = e.prefill(prompt), []
        for _ in range(6):
            out.append(int(torch.argmax(logits)))
            logits = e.forward(out[-1:])[-1]
        outs.append(out)
    assert outs[0] == outs[1]
    with pytest.raises(RuntimeError, match="restore_linears"):
        fast.load_state_dict(stock.state_dict())
    restore_linears(fast)
    assert type(fast.model.embed_tokens) is nn.Embedding
    assert all(torch.equal(t, before[name]) for name, t in fast.named_parameters() if name in before)
    assert torch.equal(fast.lm_head.weight, before["lm_head.weight"])
