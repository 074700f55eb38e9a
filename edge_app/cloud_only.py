"""Cloud-only streaming: the target alone writes the answer, one token per forward pass.

A baseline (`--mode cloud`), and where `auto` hands an answer over when the model says the
speculative modes are slower (then the session already holds the committed prefix).
"""
from __future__ import annotations

import time

import codec
from edge_app.answer import AnswerState
from edge_app.link import CloudLink
from edge_app.policy import Estimates, ema


async def run_cloud_only(answer: AnswerState, link: CloudLink, estimates: Estimates,
                         prompt_sent: bool = False) -> None:
    """Stream the rest of the answer from the target. prompt_sent: the session already holds
    the committed prefix (auto switching mid-answer), so no Prompt / Prefilled round."""
    if not prompt_sent:
        await link.send(answer.prompt_message())
    # the cloud caps Generate at the Prompt's budget, so it may go up before Prefilled comes down
    await link.send(codec.Generate(max_new_tokens=answer.remaining()))
    prefilled = prompt_sent
    last = None
    while answer.done_reason is None:
        with answer.meters.phase("network_wait"):
            msg = await link.recv()
        if isinstance(msg, codec.Prefilled):
            prefilled = True
            if msg.token is not None:
                answer.commit([msg.token])
        elif not prefilled:
            continue  # left over from an earlier answer on this session
        elif isinstance(msg, codec.Tokens):
            if msg.ids and msg.pos != len(answer.committed):
                raise RuntimeError(f"the verifier sent position {msg.pos}, the edge holds {len(answer.committed)}")
            now = time.perf_counter()
            if last is not None and msg.ids:
                estimates.t_cloud = ema(estimates.t_cloud, (now - last) / len(msg.ids), 0.2)
            last = now
            answer.commit(list(msg.ids))
            if msg.done:
                return

