"""examples/speculative_decoding.py against the real CPU server: drafts verified by one Prefill
per layer and rolled back with TruncateSequence give exactly the target's greedy tokens, with every
step's logits and every layer's attention output at every position against plain greedy decoding
in float64; the cache ends holding exactly the committed tokens."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import kv_transformer as kt  # noqa: E402
import speculative_decoding as sd  # noqa: E402

TOLERANCE = 1e-3  # relative to each row's largest value, float32 attention and activations


def test_speculative_decoding_is_greedy_decoding(server_address):
    from attn_client import Client

    cfg = sd.CONFIG
    lengths, steps, k = [5, 12, 19, 30], 40, 4
    weights = kt.random_weights(cfg, seed=3)
    prompts = kt.make_prompts(cfg, lengths, seed=3)
    draft = kt.Model(cfg, sd.draft_weights(weights, 0.05, seed=3).astype(np.float32),
                     sd.RecordingLocalAttention(cfg, np.float32))
    with Client(server_address, timeout=60) as client:
        served = sd.SpeculativeServedAttention(client, cfg, [n + steps + 2 * k + 2 for n in lengths])
        target = kt.Model(cfg, weights.astype(np.float32), served)
        run = sd.speculative_generate(target, draft, prompts, steps, k)
        described = client.describe_kv_cache(served.cache)
        # Each sequence holds its committed tokens but the newest, at every layer, in whole pages.
        for s in described.sequences:
            assert list(s.lengths) == [served.lengths[s.id]] * cfg.layers, s
            assert s.pages == -(-served.lengths[s.id] // served.PAGE_SIZE), s
        assert described.pages_used == sum(s.pages for s in described.sequences)
        served.close()

    accepted = sum(map(sum, run.accepted))
    # The draft is right often but not always: both the accept and the rollback paths ran.
    assert 0 < accepted < run.proposed, run.accepted
    assert served.truncations > 0
    assert served.freed_pages > 0, "some rollback crossed a page boundary"
    assert run.rounds < steps, "fewer target passes than tokens"
    assert served.calls == run.rounds * cfg.layers  # one Prefill per layer per round

    # Exactly greedy: plain greedy decoding in float64, not fed the speculative tokens.
    greedy = kt.Model(cfg, weights, kt.LocalAttention(cfg)).generate(prompts, steps)
    assert run.generation.tokens == greedy.tokens

    differ, worst_logits, worst_attention, rows = sd.check(cfg, weights, prompts, steps, run, served, TOLERANCE)
    assert not differ
    assert rows == cfg.layers * sum(n + steps - 1 for n in lengths)
    assert worst_logits <= TOLERANCE, f"largest relative logit error {worst_logits:.2e}"
    assert worst_attention <= TOLERANCE, f"largest relative attention error {worst_attention:.2e}"


def test_main_with_check(server_address):
    assert sd.main(["--server", server_address, "--steps", "16", "--check"]) == 0
