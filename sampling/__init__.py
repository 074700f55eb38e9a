"""The sampling math of PicoSpec, in one pure home: numbers in, numbers out, no I/O.

Both sides import it: the edge to build the distribution it samples drafts from, the cloud to run
the exact accept / recover rule against it.
"""
from sampling.core import (
    DRAFT_RESOLUTION,
    SamplingParams,
    SparseDist,
    Outcome,
    draft_dist,
    inverse_cdf,
    recover_from_top_k,
    residual_probs,
    sample_dense,
    sample_sparse,
    softmax,
    target_probs,
    token_prob,
    top_k_sparse,
    truncate_probs,
    verify_block,
    verify_block_greedy,
    verify_block_u,
    verify_token,
    accepts,
    prob_of,
)
from sampling.sequences import common_prefix_len, reusable_prefix

__all__ = [
    "DRAFT_RESOLUTION",
    "SamplingParams",
    "SparseDist",
    "Outcome",
    "draft_dist",
    "inverse_cdf",
    "recover_from_top_k",
    "residual_probs",
    "sample_dense",
    "sample_sparse",
    "softmax",
    "target_probs",
    "token_prob",
    "top_k_sparse",
    "truncate_probs",
    "verify_block",
    "verify_block_greedy",
    "verify_block_u",
    "verify_token",
    "accepts",
    "prob_of",
    "common_prefix_len",
    "reusable_prefix",
]
