#!/usr/bin/env python3
"""Ping-pong decoding: the client's projections and MLP for one micro-batch run while attnd
attends the other.

kv_transformer.py's model (random weights, numpy for everything but attention, attnd for attention
over a paged KV cache) decodes two micro-batches of sequences, A and B. A plain decode loop waits
for each Decode call: while attnd attends, the client is idle, and while the client computes,
attnd is. The ping-pong loop sends each layer's Decode without waiting (Client.decode_async) and
works on the other micro-batch meanwhile:

    client:  A.pre(l) | B.pre(l) | A.post(l) A.pre(l+1) | B.post(l) B.pre(l+1) | A.post(l+1) ...
    attnd:            | A.attn(l) | B.attn(l)           | A.attn(l+1)          | B.attn(l+1) ...

(pre: norm, q/k/v projections, rotary; post: output projection, MLP, and after the last layer the
logits and the next token.) Both loops run from the same prompts on caches of their own; the
ping-pong loop's tokens and logits must equal the plain loop's bit for bit (each micro-batch sees
the same arithmetic in the same order, and attnd's Decode results do not depend on what else it
runs). It prints the tokens/s of both loops and their ratio.

    python3 examples/pingpong_decode.py --server 127.0.0.1:50051

The gain needs an idle side to fill: on a GPU server, attention runs on the GPU while the client's
numpy runs on the host. A CPU server on the client's own cores shares them with it, so there the
ratio stays near 1 (or below).

(PYTHONPATH must reach attn_client: build/<preset>/python.)
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kv_transformer as kt  # noqa: E402


class Ready:
    """The result of a call already made, in a future's clothes (the plain loop's)."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class PingPongAttention(kt.ServedAttention):
    """ServedAttention whose Decode calls may leave without waiting."""

    def send(self, layer, ids, q, k, v, wait: bool):
        """A Decode call: made and waited for (the plain loop), or on its way (Client.decode_async,
        the ping-pong loop); either way something whose result() is its KvResult."""
        args = (self.cache, layer, ids, self._wire(q), self._wire(k), self._wire(v))
        return Ready(self.client.decode(*args)) if wait else self.client.decode_async(*args)

    def output(self, call):
        """A call's attention output, float32 [n, Hq, D] (waiting for it if need be)."""
        return self._result(call.result())


def prefill(model, attention, batches, prompts):
    """One Prefill per layer for every micro-batch's prompts; each micro-batch's first logits."""
    first = {}
    for name, ids in batches.items():
        mine = [prompts[i] for i in ids]
        lens = [len(p) for p in mine]
        logits = model._forward(np.concatenate(mine), np.concatenate([np.arange(n) for n in lens]),
                                lambda layer, q, k, v: attention.prefill(layer, [f"seq{i}" for i in ids], lens, q, k, v))
        first[name] = logits[np.cumsum(lens) - 1]
    return first


def decode(model, attention, batches, prompts, first_logits, steps, overlap):
    """`steps` greedy decode steps of every micro-batch, one Decode per layer per micro-batch per
    step; overlap: the ping-pong loop. Returns the tokens and logits of each micro-batch (per step)
    and the seconds the loop took."""
    layers = len(model.w.layers)
    ids = {name: [f"seq{i}" for i in members] for name, members in batches.items()}
    positions = {name: np.array([len(prompts[i]) for i in members]) for name, members in batches.items()}
    tokens = {name: [] for name in batches}
    logits = {name: [] for name in batches}
    x, pending = {}, {}

    def next_token(name, step_logits):
        logits[name].append(step_logits)
        tokens[name].append(np.argmax(step_logits, axis=-1))
        x[name] = model.w.embed[tokens[name][-1]]

    def send(name, layer):
        return attention.send(layer, ids[name], *model.attention_inputs(layer, x[name], positions[name]),
                              wait=not overlap)

    for name in batches:
        next_token(name, first_logits[name])
    start = time.perf_counter()
    for name in batches:
        pending[name] = send(name, 0)
    for step in range(steps):
        for layer in range(layers):
            for name in batches:  # A, then B: each one's work overlaps the other's call
                x[name] = model.after_attention(layer, x[name], attention.output(pending[name]))
                if layer == layers - 1:
                    next_token(name, model.logits(x[name]))
                    positions[name] = positions[name] + 1
                    if step == steps - 1:
                        continue
                pending[name] = send(name, (layer + 1) % layers)
    return tokens, logits, time.perf_counter() - start


def run(client, cfg, weights, prompts, batches, steps, overlap):
    """One loop on a cache of its own: its tokens, logits and seconds."""
    attention = PingPongAttention(client, cfg, [len(p) + steps + 1 for p in prompts])
    try:
        model = kt.Model(cfg, weights, attention)
        first = prefill(model, attention, batches, prompts)
        return decode(model, attention, batches, prompts, first, steps, overlap)
    finally:
        attention.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", default="127.0.0.1:50051")
    parser.add_argument("--steps", type=int, default=32, help="decode steps (a token per sequence each)")
    parser.add_argument("--sequences", type=int, default=16, help="sequences, split into two micro-batches")
    parser.add_argument("--prompt-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    from attn_client import Client

    cfg = kt.Config()
    weights = kt.random_weights(cfg, args.seed).astype(np.float32)
    prompts = kt.make_prompts(cfg, [args.prompt_length + i for i in range(args.sequences)], args.seed)
    half = args.sequences // 2
    batches = {"A": list(range(half)), "B": list(range(half, args.sequences))}
    tokens_per_loop = args.sequences * args.steps
    with Client(args.server, timeout=60) as client:
        run(client, cfg, weights, prompts, batches, 2, overlap=True)  # warm-up: both code paths
        run(client, cfg, weights, prompts, batches, 2, overlap=False)
        plain_tokens, plain_logits, plain_s = run(client, cfg, weights, prompts, batches, args.steps, overlap=False)
        pp_tokens, pp_logits, pp_s = run(client, cfg, weights, prompts, batches, args.steps, overlap=True)
        info = client.server_info()
        device = info.devices[0].name if info.devices else info.backend
    same = all(np.array_equal(a, b) for name in batches
               for a, b in zip(plain_tokens[name] + plain_logits[name], pp_tokens[name] + pp_logits[name]))
    print(f"server {args.server} ({device}); {args.sequences} sequences in micro-batches of "
          f"{[len(m) for m in batches.values()]}, prompts of {args.prompt_length}.., {args.steps} steps, "
          f"{cfg.layers} layers")
    print(f"plain loop:     {plain_s:.2f} s, {tokens_per_loop / plain_s:.0f} tokens/s")
    print(f"ping-pong loop: {pp_s:.2f} s, {tokens_per_loop / pp_s:.0f} tokens/s")
    print(f"ratio: {plain_s / pp_s:.2f}x; ping-pong tokens and logits equal the plain loop's bit for bit: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
