"""Where the accept / recover rule runs (cloud/rule_impl.py): numpy on the host, or torch where the
target's logits are (`picospec serve --rule {auto,numpy,torch}`).

What a user would notice if this broke: a verifier started with --rule torch that writes other
greedy text than the target alone, sampled text that no longer follows the target, or a GPU
verifier that copies whole logit rows to the host at every step.
"""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from cloud.cli import add_serve_arguments, server_config
from cloud.draft_queue import Block
from cloud.engine import TargetEngine
from cloud.rule_impl import resolve_rule
from cloud.server import ServerConfig
from cloud.session import VerifySession
from cloud.verify import apply_pass, verify_pass
from codec import VerdictKind
from sampling import SamplingParams, draft_dist, sample_sparse
from tests.test_pipeline_tiny import PROMPTS, _empirical, _second_token_marginal, generate, reference
from tests.tiny import EOS, ServerThread, TinyDrafter, perturbed, tiny_model

SAMPLED = [SamplingParams(1.0, top_p=0.95, seed=7), SamplingParams(0.7, top_k=5, seed=8),
           SamplingParams(1.3, top_p=0.9, top_k=20, seed=9)]


@pytest.fixture(scope="module")
def target():
    return tiny_model(0)


@pytest.fixture(scope="module")
def servers(target):
    """One verifier per rule implementation, over the same target."""
    with ServerThread(TargetEngine(target), ServerConfig(port=0, rule="numpy")) as on_host, \
            ServerThread(TargetEngine(target), ServerConfig(port=0, rule="torch")) as on_device:
        yield {"numpy": on_host, "torch": on_device}


def test_the_rule_option_reaches_the_sessions(servers):
    assert resolve_rule("auto", "cpu") == "numpy"
    assert resolve_rule("auto", "cuda") == resolve_rule("auto", torch.device("cuda", 1)) == "torch"
    assert resolve_rule("numpy", "cuda") == "numpy" and resolve_rule("torch", "cpu") == "torch"
    with pytest.raises(ValueError, match="unknown rule"):
        resolve_rule("jax", "cpu")
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    assert server_config(p.parse_args([])).rule == "auto"
    assert server_config(p.parse_args(["--rule", "torch"])).rule == "torch"
    for impl, s in servers.items():
        assert s.server.rule_impl == impl


@pytest.mark.parametrize("mode,fill", [("pipeline", True), ("sync", False), ("cloud", False)])
def test_greedy_answers_with_the_torch_rule_are_the_targets_own(servers, target, mode, fill):
    for prompt in PROMPTS:
        want = reference(target, prompt, 32)
        for impl, server in servers.items():
            ans = generate(server.url, TinyDrafter(perturbed(target, 1.0)), prompt, max_new_tokens=32,
                           mode=mode, block=4, fill=fill)
            assert ans.token_ids == want, impl


def test_sampled_answers_with_the_torch_rule_follow_the_target(servers, target):
    """Prefilled, drafted, recovered and filled tokens through a --rule torch verifier: the second
    token's empirical distribution is the target's marginal (as the numpy rule's is in
    tests/test_pipeline_tiny.py)."""
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=0)
    emp = _empirical(servers["torch"], target, "exact", params, 600, fill=True, position=1)
    p = _second_token_marginal(target, PROMPTS[1], params)
    bound = 2 * 0.5 * np.sqrt(int((p > 0).sum()) / 600)
    assert 0.5 * np.abs(emp - p).sum() < bound


# -- the session level: the same verdicts, and no logit row leaves the device ------------------------
def _host_copy(*args, **kwargs):
    raise AssertionError("a logit row was copied to the host")


def _draft(draft_model, committed, k, params, rng):
    """k ids sampled from the draft's quantised q after `committed`, with their q."""
    ids, dists = [], []
    with torch.inference_mode():
        for _ in range(k):
            logits = draft_model(input_ids=torch.tensor([committed + ids])).logits[0, -1].double().numpy()
            q = draft_dist(logits, params)
            ids.append(sample_sparse(q, rng))
            dists.append(q)
    return ids, dists


def _lockstep(sessions: dict, draft_model, params, variant, rng, passes=30, prompt=(5, 9, 11)):
    """Drive sessions (one per impl) through the same blocks; every pass's verdict and state must
    agree. The torch session runs with Tensor.numpy and Tensor.cpu raising. Returns the kinds seen."""
    kinds = set()
    first = {}
    for impl, s in sessions.items():
        with pytest.MonkeyPatch.context() as mp:
            if impl == "torch":
                mp.setattr(torch.Tensor, "numpy", _host_copy)
                mp.setattr(torch.Tensor, "cpu", _host_copy)
            rest = s.begin_prompt(list(prompt), 200)
            first[impl] = s.end_prompt(list(prompt), 200, s.engine.forward(rest)[-1])
    assert len(set(first.values())) == 1
    forced = None
    for _ in range(passes):
        ref = next(iter(sessions.values()))
        if ref.committed[-1] == EOS or ref.budget_left < 8:
            break
        k = int(rng.integers(1, 5))
        ids, dists = _draft(draft_model, ref.committed + ([forced] if forced is not None else []), k, params, rng)
        n_forced = int(forced is not None)
        if n_forced:
            ids, dists = [forced] + ids, [dists[0]] + dists
        wait = bool(rng.integers(2))
        seen = []
        for impl, s in sessions.items():
            q = {"dists": dists} if variant == "exact" else {"q_scalar": [d.prob(x) for d, x in zip(dists, ids)]}
            if params.greedy:
                q = {}
            assert s.add_draft(Block(s.epoch, len(s.committed), list(ids), n_forced, wait=wait, **q))
            block = s.take_block(16)
            with pytest.MonkeyPatch.context() as mp:
                if impl == "torch":
                    mp.setattr(torch.Tensor, "numpy", _host_copy)
                    mp.setattr(torch.Tensor, "cpu", _host_copy)
                r = verify_pass(s, block)
                apply_pass(s, block, r)
            assert (s.pending_row is None) == (s.engine.cache_len < len(s.committed))
            assert s.pending_row is None or isinstance(s.pending_row, torch.Tensor)
            seen.append((r.accepted, r.token, r.kind, r.top_ids, s.committed[:], s.engine.cache_len, s.epoch))
        assert seen[0] == seen[1]
        kinds.add(seen[0][2])
        forced = seen[0][3][0] if seen[0][2] is VerdictKind.RECOVER_ON_EDGE else None
    return kinds


@pytest.mark.parametrize("variant", ["exact", "paper"])
@pytest.mark.parametrize("params", SAMPLED + [SamplingParams()])
def test_numpy_and_torch_rules_give_the_same_verdicts_and_keep_rows_on_the_device(target, variant, params):
    """Both implementations draw the same uniforms from the session's seed and, on a CPU target
    (float64 from the same logits), pick the same tokens with them: fed the same blocks, two
    sessions commit the same tokens pass for pass (the Prefilled, recovered, bonus, forced ids),
    hold the same cache and pending row; the torch one never copies a row to the host.
    (End to end the edge's own draws depend on timing, so answers are compared in distribution.)"""
    rng = np.random.default_rng(params.seed or 0)
    sessions = {impl: VerifySession(TargetEngine(target), params, variant, paper_top_k=3, eos_id=EOS, rule_impl=impl)
                for impl in ("numpy", "torch")}
    kinds = _lockstep(sessions, perturbed(target, 1.0), params, variant, rng)
    rejected = VerdictKind.RECOVER_ON_EDGE if variant == "paper" and not params.greedy else VerdictKind.RECOVERED
    assert rejected in kinds and kinds & {VerdictKind.ACCEPTED, VerdictKind.BONUS}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_rows_stay_there_and_greedy_is_the_targets(target):
    """The target on CUDA with the torch rule: no row is copied to the host (Tensor.cpu and
    Tensor.numpy raise), pending rows live on the GPU, and greedy text is the CPU target's."""
    gpu_model = tiny_model(0).to("cuda")
    params = SamplingParams()
    s = VerifySession(TargetEngine(gpu_model, device="cuda"), params, eos_id=EOS,
                      rule_impl=resolve_rule("auto", "cuda"))
    want = reference(target, [5, 9, 11], 40)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "numpy", _host_copy)
        mp.setattr(torch.Tensor, "cpu", _host_copy)
        rest = s.begin_prompt([5, 9, 11], 40)
        assert s.end_prompt([5, 9, 11], 40, s.engine.forward(rest)[-1]) == want[0]
        while s.generated + 4 < len(want):
            ids = list(want[s.generated:s.generated + 3])
            if s.passes % 2:  # every other block is rejected at its second id
                ids[1] = (ids[1] + 1) % gpu_model.config.vocab_size
            assert s.add_draft(Block(s.epoch, len(s.committed), ids))
            block = s.take_block(16)
            apply_pass(s, block, verify_pass(s, block))
            assert s.pending_row is None or s.pending_row.device.type == "cuda"
            s.prepare_next_token()  # then one cloud-only token: a pass unless a row is pending
            s.commit_next_token()
    assert s.committed[3:] == want[:s.generated]
