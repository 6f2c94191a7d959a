"""examples/kv_transformer.py against the real CPU server: every step's logits with attention on
attnd (float32 cache) against the same model run here in float64, and the same greedy tokens."""

import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import kv_transformer as kt  # noqa: E402

TOLERANCE = 1e-3  # relative to each row's largest logit, float32 attention and activations


@pytest.fixture(scope="module")
def server_address():
    """The binary named by $ATTND on a free loopback port, CPU backend."""
    work = tempfile.mkdtemp(prefix="attnd-example-")
    port_file, log_path = os.path.join(work, "port"), os.path.join(work, "attnd.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([os.environ["ATTND"], "--listen", "127.0.0.1:0", "--port-file", port_file,
                                 "--backend", "cpu"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 30
        while not (os.path.exists(port_file) and open(port_file).read().split()):
            assert proc.poll() is None, "attnd exited at start: " + open(log_path).read()
            assert time.time() < deadline, "attnd did not start in 30 s"
            time.sleep(0.02)
        yield "127.0.0.1:" + open(port_file).read().split()[0]
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0, open(log_path).read()


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
