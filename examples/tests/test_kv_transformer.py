"""examples/kv_transformer.py against the real CPU server: every step's logits with attention on
attnd (float32 cache) against the same model run here in float64, and the same greedy tokens."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import kv_transformer as kt  # noqa: E402

TOLERANCE = 1e-3  # relative to each row's largest logit, float32 attention and activations


def test_served_decode_matches_float64_reference(server_address):
    from attn_client import Client

    cfg = kt.Config()
    lengths = [5, 9, 13, 17, 24, 31, 40, 48]
    steps = 64
    weights = kt.random_weights(cfg, seed=7)
    prompts = kt.make_prompts(cfg, lengths, seed=7)
    with Client(server_address, timeout=60) as client:
        attention = kt.ServedAttention(client, cfg, [n + steps for n in lengths])
        served = kt.Model(cfg, weights.astype(np.float32), attention).generate(prompts, steps)
        described = client.describe_kv_cache(attention.cache)
        assert sorted(s.id for s in described.sequences) == [f"seq{i}" for i in range(len(lengths))]
        for s in described.sequences:  # every layer holds the prompt and all but the last token
            want = lengths[int(s.id[3:])] + steps - 1
            assert list(s.lengths) == [want] * cfg.layers, s
        assert attention.calls == cfg.layers * steps  # 1 Prefill + (steps - 1) Decodes per layer
        attention.close()
        assert attention.cache not in [c.handle for c in client.list_kv_caches().caches]

    reference = kt.Model(cfg, weights, kt.LocalAttention(cfg)).generate(prompts, steps, forced=served.tokens)
    assert len(served.logits) == len(reference.logits) == steps
    worst, mismatches = kt.compare(served, reference, TOLERANCE)
    assert worst <= TOLERANCE, f"largest relative logit error {worst:.2e}"
    assert not mismatches, f"greedy tokens differ (sequence, step, top-2 margin): {mismatches}"
