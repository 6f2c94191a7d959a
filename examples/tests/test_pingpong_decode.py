"""examples/pingpong_decode.py against the real CPU server: the ping-pong loop (each micro-batch's
Decode in flight while the client works on the other's layer) gives the plain loop's tokens and
logits bit for bit, and those follow the same model run here in float64."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import kv_transformer as kt  # noqa: E402
import pingpong_decode as pp  # noqa: E402

TOLERANCE = 1e-3  # relative to each row's largest logit, float32 attention and activations


def test_ping_pong_equals_the_plain_loop_and_float64(server_address, capsys):
    from attn_client import Client

    cfg = kt.Config()
    weights = kt.random_weights(cfg, seed=5)
    prompts = kt.make_prompts(cfg, [7, 12, 3, 20, 9], seed=5)
    batches = {"A": [0, 1, 2], "B": [3, 4]}
    steps = 6
    with Client(server_address, timeout=60) as client:
        plain = pp.run(client, cfg, weights.astype(np.float32), prompts, batches, steps, overlap=False)
        pingpong = pp.run(client, cfg, weights.astype(np.float32), prompts, batches, steps, overlap=True)
        assert not client.list_kv_caches().caches  # each loop deleted its cache
    for name in batches:
        assert len(plain[0][name]) == len(pingpong[0][name]) == steps + 1
        for got, want in zip(pingpong[0][name] + pingpong[1][name], plain[0][name] + plain[1][name]):
            np.testing.assert_array_equal(got, want)
        # The plain loop against float64, fed the same tokens.
        mine = [prompts[i] for i in batches[name]]
        forced = np.stack(plain[0][name], axis=1)
        reference = kt.Model(cfg, weights, kt.LocalAttention(cfg)).generate(mine, steps + 1, forced=forced)
        served = kt.Generation([list(row) for row in forced], plain[1][name])
        worst, mismatches = kt.compare(served, reference, TOLERANCE)
        assert worst <= TOLERANCE, f"micro-batch {name}: largest relative logit error {worst:.2e}"
        assert not mismatches, f"micro-batch {name}: greedy tokens differ: {mismatches}"

    assert pp.main(["--server", server_address, "--steps", "3", "--sequences", "4", "--prompt-length", "8"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "ratio: " in out and "bit for bit: True" in out, out
