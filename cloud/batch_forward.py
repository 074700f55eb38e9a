"""One forward pass for the new rows of several sessions, each with its own KV cache.

Everything in a decoder layer but attention is position-independent and works row by row: the
norms, the q/k/v, o and MLP projections, the residual adds. Those run once over the rows of every
session stacked together ([sum_rows, H]); only attention is split per session, against that
session's own DynamicCache, with its own positions and causal mask. The output layer runs only on
the rows each session needs (a verify pass: all of them; a prefill chunk or a next-token step: the
last one).

Exactness: with the row-streaming kernel (cloud/kernels.py) every projection gives each row bit for
bit what it gives that row alone, and attention, norms and rotary are computed per session, so a
session's rows do not depend on who else is in the pass, however many rows it holds. The result
is bit for bit the model's own forward pass of that session alone (tests/test_batch_forward.py), which is
what a tick of one item runs; without the kernel the two agree to float32 rounding (~1e-6).

Supported: decoder-only models laid out as transformers' Llama / Qwen2 (model.model.layers with
input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp; rotary_emb; norm;
lm_head), full attention on every layer. `supports_batching` says whether a model qualifies; the
scheduler runs anything else one pass at a time through the engine.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb


@dataclass
class Segment:
    """One session's share of a batched pass: `ids` fed after its cache; `all_rows`: logits for
    every fed row (a verify pass) or only for the last (a prefill chunk, a next-token step)."""

    cache: object  # the session's DynamicCache; extended by len(ids)
    ids: list[int]
    all_rows: bool = True


def supports_batching(model) -> bool:
    """Whether batched_forward can run this model exactly (Qwen2 / Llama layout, full attention,
    default rotary, SDPA or eager attention)."""
    cfg = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    if cfg is None or inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return False
    if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or ["full_attention"]):
        return False
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        return False
    if getattr(cfg, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return False
    layer = inner.layers[0]
    return all(hasattr(layer, a) for a in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"))


def cache_lengths(cache) -> list[int]:
    """Positions held by each layer of a DynamicCache (they differ only mid-pass)."""
    return [layer.get_seq_length() if getattr(layer, "is_initialized", False) else 0 for layer in cache.layers]


def restore_cache(cache, lengths: list[int]) -> None:
    """Crop every layer back to the length it had (after a pass that failed part way)."""
    for layer, now, n in zip(cache.layers, cache_lengths(cache), lengths):
        if now > n:
            layer.crop(n - now)


def causal_mask(past: int, rows: int, device) -> torch.Tensor | None:
    """[1, 1, rows, past + rows] bool: new row i sees cached positions and new rows <= i. None for
    one row (it sees everything)."""
    if rows == 1:
        return None
    q_pos = torch.arange(rows, device=device)[:, None] + past
    kv_pos = torch.arange(past + rows, device=device)[None, :]
    return (kv_pos <= q_pos)[None, None]


@torch.inference_mode()
def batched_forward(model, segments: list[Segment]) -> list[torch.Tensor]:
    """One forward pass over every segment's ids; extends each segment's cache. Returns, per segment,
    float32 logits on the model's device: [len(ids), V] when all_rows, else [1, V] (its last row)."""
    if not segments or any(not s.ids for s in segments):
        raise ValueError("every segment needs at least one id")
    inner = model.model
    device = inner.embed_tokens.weight.device
    sizes = [len(s.ids) for s in segments]
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + n)
    pasts = [int(s.cache.get_seq_length()) for s in segments]

    # 1. embeddings and rotary angles of every row, each at its own absolute position
    ids = torch.tensor([[t for s in segments for t in s.ids]], dtype=torch.long, device=device)  # [1, R]
    positions = torch.cat([torch.arange(p, p + n, device=device) for p, n in zip(pasts, sizes)])[None]  # [1, R]
    hidden = inner.embed_tokens(ids)  # [1, R, H]
    cos, sin = inner.rotary_emb(hidden, positions)  # [1, R, head_dim] each
    masks = [causal_mask(p, n, device) for p, n in zip(pasts, sizes)]

    # 2. the decoder layers: row-wise parts on all rows at once, attention per session
    for layer_idx, layer in enumerate(inner.layers):
        attn = layer.self_attn
        head_dim = attn.head_dim
        residual = hidden
        x = layer.input_layernorm(hidden)
        q = attn.q_proj(x).view(1, -1, attn.config.num_attention_heads, head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(1, -1, attn.config.num_key_value_heads, head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(1, -1, attn.config.num_key_value_heads, head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)  # [1, heads, R, head_dim]
        outs = []
        for seg, a, b, mask in zip(segments, starts, starts[1:], masks):
            keys, values = seg.cache.update(k[:, :, a:b], v[:, :, a:b], layer_idx)
            out, _ = sdpa_attention_forward(attn, q[:, :, a:b], keys, values, mask, dropout=0.0,
                                            scaling=attn.scaling)  # [1, rows, heads, head_dim]
            outs.append(out)
        attn_out = torch.cat(outs, dim=1).reshape(1, ids.shape[1], -1)  # [1, R, heads * head_dim]
        hidden = residual + attn.o_proj(attn_out)
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    # 3. the output layer on the rows each segment needs
    hidden = inner.norm(hidden)[0]  # [R, H]
    keep = [torch.arange(a, b) if s.all_rows else torch.tensor([b - 1])
            for s, a, b in zip(segments, starts, starts[1:])]
    kept = torch.cat(keep).to(device)
    logits = model.lm_head(hidden.index_select(0, kept)[None])[0]  # [kept rows, V]
    if logits.dtype != torch.float32:
        logits = logits.float()
    return list(torch.split(logits, [len(k) for k in keep]))
