"""The T(k) probe over the real protocol: a tiny verifier whose passes cost a known time per token."""
from __future__ import annotations

import asyncio

import codec
from cloud.engine import TargetEngine
from edge_app.link import CloudLink
from edge_app.probe import measure_verify_curve
from tests.tiny import ServerThread, SlowEngine, fingerprint, tiny_model


class PerTokenEngine(SlowEngine):
    """A verify pass sleeps 5 ms + 4 ms per fed token: T(k) must come out increasing with k."""

    def forward(self, ids, *args, **kwargs):
        self.delay_s = 0.005 + 0.004 * len(ids)
        return super().forward(ids, *args, **kwargs)

    def fork(self):
        return PerTokenEngine(self.model, self.tokenizer, self.device, self.model_lock)


def test_probe_measures_one_pass_per_block_size_and_sees_it_grow():
    engine = PerTokenEngine(tiny_model(0))

    async def probe(url):
        link = CloudLink(url)
        await link.connect(codec.Hello(fingerprint=fingerprint(), sampling={
            "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None}))
        try:
            return await measure_verify_curve(link, link.welcome.vocab_size, ks=(1, 4, 16), context=20, repeats=2)
        finally:
            await link.close()

    with ServerThread(engine) as server:
        curve = asyncio.run(probe(server.url))
    assert sorted(curve) == [1, 4, 16]
    # a pass feeds the unfed committed token too: k + 1 tokens
    assert 0.005 + 0.004 * 2 <= curve[1] < curve[4] < curve[16]
    assert curve[16] >= 0.005 + 0.004 * 17
