#!/usr/bin/env python3
"""Speculative decoding with attnd: a draft proposes k tokens, the target checks them in one
Prefill per layer, and TruncateSequence rolls the target's KV cache back past the rejected ones.

The target is kv_transformer.py's model (random weights, numpy for everything but attention) with
its attention on attnd, every layer's K/V in one paged cache. The draft is a cheap stand-in for a
distilled model: the target's weights with noise added, its attention computed here. Each round,
per sequence (all sequences in lockstep, packed into the same calls):

  1. the draft, fed the tokens it has not seen yet, proposes d_1..d_k greedily;
  2. the target runs one causal Prefill per layer of [its pending tokens, d_1..d_k] at their
     positions: row i's logits are its own greedy pick t_(i+1) after d_1..d_i;
  3. it accepts the longest prefix with d_i == t_i, then its own t_(j+1) after it (so every
     round yields at least one token), and truncate_sequence cuts the cache back to the accepted
     tokens: the rejected drafts' K/V are gone, and the next round's Prefill writes over them.

With greedy verification the result is exactly the target's greedy decoding; --check runs plain
greedy decoding of the target in float64 here (kv_transformer.LocalAttention) and compares the
tokens, every step's logits and every layer's attention output at every position.

    python3 examples/speculative_decoding.py --server 127.0.0.1:50051 --check

(PYTHONPATH must reach attn_client: build/<preset>/python.)
"""

import argparse
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kv_transformer as kt  # noqa: E402


# kv_transformer's model, narrower: the draft and the float64 check run here in numpy.
CONFIG = kt.Config(vocab=512, d_model=256, layers=4, q_heads=4, kv_heads=2, head_dim=64, mlp_hidden=512)


def draft_weights(weights: kt.Weights, noise: float, seed: int) -> kt.Weights:
    """The target's weights, each perturbed by `noise` times its own spread: a draft that agrees
    with the target most of the time, not always."""
    rng = np.random.default_rng(seed + 2)
    jitter = lambda a: a + noise * a.std() * rng.standard_normal(a.shape)  # noqa: E731
    return kt.Weights(jitter(weights.embed), [{k: jitter(v) for k, v in layer.items()} for layer in weights.layers],
                      jitter(weights.final_norm), jitter(weights.unembed))


class Recorder:
    """Attention outputs by (sequence, layer, position): the last value written for a position
    is the one its committed token produced (a rejected draft's row is written over when the
    position is fed again)."""

    def __init__(self):
        self.rows = {}

    def record(self, layer, ids, lens, starts, o):
        row = 0
        for sid, n, start in zip(ids, lens, starts):
            for t in range(n):
                self.rows[(sid, layer, start + t)] = np.asarray(o[row + t], dtype=np.float64)
            row += n


class RecordingLocalAttention(kt.LocalAttention):
    """kv_transformer's float64 attention, recording every output row, with a rollback."""

    def __init__(self, cfg, dtype=np.float64):
        super().__init__(cfg, dtype)
        self.recorder = Recorder()

    def length(self, sid):
        return self.k[0][sid].shape[0] if sid in self.k[0] else 0

    def prefill(self, layer, ids, lens, q, k, v):
        starts = [self.k[layer][sid].shape[0] if sid in self.k[layer] else 0 for sid in ids]
        o = super().prefill(layer, ids, lens, q, k, v)
        self.recorder.record(layer, ids, lens, starts, o)
        return o

    def decode(self, layer, ids, q, k, v):
        return self.prefill(layer, ids, [1] * len(ids), q, k, v)

    def truncate(self, sid, length):
        for layer in range(self.cfg.layers):
            if sid in self.k[layer]:
                self.k[layer][sid] = self.k[layer][sid][:length]
                self.v[layer][sid] = self.v[layer][sid][:length]


class SpeculativeServedAttention(kt.ServedAttention):
    """kv_transformer's ServedAttention, recording outputs by position, with TruncateSequence."""

    def __init__(self, client, cfg, max_lengths, dtype="float32"):
        super().__init__(client, cfg, max_lengths, dtype)
        self.layers = cfg.layers
        self.recorder = Recorder()
        self.lengths = {}  # sequence -> tokens the cache holds (every layer)
        self.truncations = self.freed_pages = self.copied_pages = 0

    def prefill(self, layer, ids, lens, q, k, v):
        o = super().prefill(layer, ids, lens, q, k, v)
        self.recorder.record(layer, ids, lens, [self.lengths.get(sid, 0) for sid in ids], o)
        if layer == self.layers - 1:
            for sid, n in zip(ids, lens):
                self.lengths[sid] = self.lengths.get(sid, 0) + n
        return o

    def truncate(self, sid, length):
        r = self.client.truncate_sequence(self.cache, sid, length)
        assert list(r.sequence.lengths) == [length] * self.layers, r
        self.lengths[sid] = length
        self.truncations += 1
        self.freed_pages += r.freed_pages
        self.copied_pages += r.copied_pages


@dataclass
class SpeculativeRun:
    generation: kt.Generation  # tokens and, per step, the target logits that picked them
    rounds: int = 0
    proposed: int = 0
    accepted: list = field(default_factory=list)  # per round, per sequence taking part: accepted


def speculative_generate(target: kt.Model, draft: kt.Model, prompts, steps, k) -> SpeculativeRun:
    """`steps` greedy tokens of `target` after each prompt, drafted `k` at a time by `draft`.
    Both models' attention objects hold K/V per sequence and can truncate(sid, length)."""
    n = len(prompts)
    ids = [f"seq{i}" for i in range(n)]
    tokens = [list(map(int, p)) for p in prompts]  # committed: prompt + generated
    logits = [[] for _ in range(n)]  # per sequence, per generated token: the target's row
    fed_target, fed_draft = [0] * n, [0] * n  # tokens each model's cache holds
    run = SpeculativeRun(kt.Generation([[] for _ in range(n)]))

    def forward(model, feeds, starts, attend):
        toks = np.concatenate([np.asarray(f, dtype=np.int64) for f in feeds])
        positions = np.concatenate([np.arange(s, s + len(f)) for f, s in zip(feeds, starts)])
        return model._forward(toks, positions, attend)

    while True:
        # The sequences still short of `steps` tokens take part in the round, packed.
        active = [i for i in range(n) if len(tokens[i]) - len(prompts[i]) < steps]
        if not active:
            break
        sids = [ids[i] for i in active]
        # 1. Draft: catch up on the committed tokens it has not seen, then k - 1 decode steps.
        feeds = [tokens[i][fed_draft[i]:] for i in active]
        lens = [len(f) for f in feeds]
        out = forward(draft, feeds, [fed_draft[i] for i in active],
                      lambda layer, q, kk, v: draft.attention.prefill(layer, sids, lens, q, kk, v))
        drafts = [[int(np.argmax(out[row]))] for row in np.cumsum(lens) - 1]
        for a, i in enumerate(active):
            fed_draft[i] += lens[a]
        for _ in range(k - 1):
            out = forward(draft, [[d[-1]] for d in drafts], [fed_draft[i] for i in active],
                          lambda layer, q, kk, v: draft.attention.decode(layer, sids, q, kk, v))
            for a, i in enumerate(active):
                drafts[a].append(int(np.argmax(out[a])))
                fed_draft[i] += 1
        # 2. Target: one Prefill per layer of the pending tokens and all k drafts, causal.
        feeds = [tokens[i][fed_target[i]:] + drafts[a] for a, i in enumerate(active)]
        lens = [len(f) for f in feeds]
        out = forward(target, feeds, [fed_target[i] for i in active],
                      lambda layer, q, kk, v: target.attention.prefill(layer, sids, lens, q, kk, v))
        # 3. Accept the longest agreeing prefix and the target's next token; roll back the rest.
        row, accepted = 0, []
        for a, i in enumerate(active):
            pending = lens[a] - k  # rows before the first draft; the last of them predicts d_1
            rows = out[row + pending - 1: row + lens[a]]  # k + 1 rows: t_1 .. t_(k+1)
            picks = [int(np.argmax(r)) for r in rows]
            j = 0
            while j < k and drafts[a][j] == picks[j]:
                j += 1
            accepted.append(j)
            committed = len(tokens[i])
            tokens[i] += drafts[a][:j] + [picks[j]]
            logits[i] += [rows[t] for t in range(j + 1)]
            # The caches keep the committed tokens but the newest (fed next round).
            keep = committed + j
            if fed_target[i] + lens[a] > keep:
                target.attention.truncate(ids[i], keep)
            fed_target[i] = keep
            if fed_draft[i] > keep:
                draft.attention.truncate(ids[i], keep)
                fed_draft[i] = keep
            row += lens[a]
        run.rounds += 1
        run.proposed += k * len(active)
        run.accepted.append(accepted)

    for i, p in enumerate(prompts):
        run.generation.tokens[i] = tokens[i][len(p):len(p) + steps]
    run.generation.logits = [np.stack([logits[i][s] for i in range(n)]) for s in range(steps)]
    return run


def max_relative_error(got: Recorder, want: Recorder, keys):
    """The worst |got - want| over a row, relative to the row's largest |want|."""
    worst = 0.0
    for key in keys:
        a, b = got.rows[key], want.rows[key]
        worst = max(worst, float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)))
    return worst


def check(cfg, weights, prompts, steps, run: SpeculativeRun, served: SpeculativeServedAttention,
          tolerance: float):
    """Plain greedy decoding of the target in float64, fed the speculative run's tokens: the
    tokens (each step's float64 argmax must be the speculative run's token), the logits of every
    step and the attention output of every layer at every position the reference computes.
    Returns (tokens that differ, worst logit error, worst attention error, rows compared)."""
    local = RecordingLocalAttention(cfg)
    reference = kt.Model(cfg, weights, local).generate(prompts, steps, forced=run.generation.tokens)
    differ = [(i, s) for s in range(steps) for i in range(len(prompts))
              if run.generation.tokens[i][s] != int(np.argmax(reference.logits[s][i]))]
    worst_logits, _ = kt.compare(run.generation, reference, tolerance)
    keys = sorted(local.recorder.rows)
    worst_attention = max_relative_error(served.recorder, local.recorder, keys)
    return differ, worst_logits, worst_attention, len(keys)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", default="127.0.0.1:50051")
    parser.add_argument("--steps", type=int, default=48, help="tokens generated per prompt")
    parser.add_argument("--draft-tokens", "-k", type=int, default=4, help="tokens the draft proposes per round")
    parser.add_argument("--draft-noise", type=float, default=0.05,
                        help="the draft's weights: the target's plus this much noise (relative)")
    parser.add_argument("--prompt-lengths", default="5,12,19,30", help="comma-separated, one prompt per length")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--check", action="store_true",
                        help="also run plain greedy decoding in float64 here and compare")
    args = parser.parse_args(argv)

    from attn_client import Client

    cfg = CONFIG
    lengths = [int(n) for n in args.prompt_lengths.split(",")]
    weights = kt.random_weights(cfg, args.seed)
    prompts = kt.make_prompts(cfg, lengths, args.seed)
    k = args.draft_tokens
    draft = kt.Model(cfg, draft_weights(weights, args.draft_noise, args.seed).astype(np.float32),
                     RecordingLocalAttention(cfg, np.float32))
    with Client(args.server, timeout=60) as client:
        # A sequence holds at most its prompt, steps - 1 tokens generated before its last round
        # and that round's k + 1 fed tokens; the rest is slack.
        served = SpeculativeServedAttention(client, cfg, [n + args.steps + 2 * k + 2 for n in lengths])
        try:
            target = kt.Model(cfg, weights.astype(np.float32), served)
            start = time.perf_counter()
            run = speculative_generate(target, draft, prompts, args.steps, k)
            seconds = time.perf_counter() - start
            info = client.describe_kv_cache(served.cache)
        finally:
            served.close()
    accepted = sum(map(sum, run.accepted))
    print(f"cache {served.cache} on {served.info.replica} ({served.info.device}), float32, pages of "
          f"{served.PAGE_SIZE}")
    print(f"{len(prompts)} prompts of {lengths} tokens, {args.steps} tokens each, k = {k}: {run.rounds} rounds "
          f"({seconds:.2f} s), {accepted} of {run.proposed} drafted tokens accepted "
          f"({accepted / run.proposed:.0%}); {served.calls} Prefill calls where plain greedy decoding makes "
          f"{cfg.layers * args.steps}")
    print(f"{served.truncations} truncations: {served.freed_pages} pages freed, {served.copied_pages} copied; "
          f"at the end {info.pages_used} pages used, lengths "
          f"{[list(s.lengths)[0] for s in sorted(info.sequences, key=lambda s: s.id)]}")
    for i, t in enumerate(run.generation.tokens):
        print(f"  seq{i}: {t[:16]}{' ...' if len(t) > 16 else ''}")
    if args.check:
        tolerance = 1e-3
        differ, worst_logits, worst_attention, rows = check(cfg, weights, prompts, args.steps, run, served,
                                                            tolerance)
        print(f"against plain greedy decoding in float64: tokens that differ {len(differ)}; largest logit "
              f"error {worst_logits:.2e}, largest attention output error {worst_attention:.2e} over {rows} "
              f"(sequence, layer, position) rows (tolerance {tolerance:g})")
        return 0 if not differ and worst_logits <= tolerance and worst_attention <= tolerance else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
