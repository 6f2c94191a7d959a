#!/usr/bin/env python3
"""A small decoder-only transformer whose attention runs on attnd over a paged KV cache.

The weights, embeddings, RMSNorm, rotary position embeddings, projections, MLP and sampling stay
here in numpy; attnd keeps every layer's K/V and runs attention: one Prefill per layer for all
prompts packed, then one Decode per layer per step for all sequences. The same model also runs
with attention computed here (LocalAttention), in float64 as a reference.

    python3 examples/kv_transformer.py --server 127.0.0.1:50051
    python3 examples/kv_transformer.py --server 127.0.0.1:50051 --check   # against float64

(PYTHONPATH must reach attn_client: build/<preset>/python.)
"""

import argparse
import sys
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Config:
    vocab: int = 1000
    d_model: int = 512
    layers: int = 4
    q_heads: int = 8
    kv_heads: int = 2
    head_dim: int = 64
    mlp_hidden: int = 1024
    rope_base: float = 10000.0
    norm_eps: float = 1e-6


@dataclass
class Weights:
    embed: np.ndarray  # [vocab, d_model]
    layers: list  # per layer: dict of arrays
    final_norm: np.ndarray
    unembed: np.ndarray  # [d_model, vocab]

    def astype(self, dtype) -> "Weights":
        cast = lambda a: a.astype(dtype)  # noqa: E731
        return Weights(cast(self.embed), [{k: cast(v) for k, v in layer.items()} for layer in self.layers],
                       cast(self.final_norm), cast(self.unembed))


def random_weights(cfg: Config, seed: int) -> Weights:
    """Weights scaled by 1/sqrt(fan-in), so that activations stay of order one through the layers."""
    rng = np.random.default_rng(seed)

    def dense(n_in, n_out):
        return rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)

    q_dim, kv_dim = cfg.q_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    layers = []
    for _ in range(cfg.layers):
        layers.append({
            "attn_norm": 1 + 0.1 * rng.standard_normal(cfg.d_model),
            "wq": dense(cfg.d_model, q_dim), "wk": dense(cfg.d_model, kv_dim),
            "wv": dense(cfg.d_model, kv_dim), "wo": dense(q_dim, cfg.d_model),
            "mlp_norm": 1 + 0.1 * rng.standard_normal(cfg.d_model),
            "w_gate": dense(cfg.d_model, cfg.mlp_hidden), "w_up": dense(cfg.d_model, cfg.mlp_hidden),
            "w_down": dense(cfg.mlp_hidden, cfg.d_model),
        })
    return Weights(rng.standard_normal((cfg.vocab, cfg.d_model)), layers,
                   1 + 0.1 * rng.standard_normal(cfg.d_model), dense(cfg.d_model, cfg.vocab))


def rms_norm(x, gain, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * gain


def rotary(x, positions, base):
    """Rotary position embedding on [tokens, heads, D] at the tokens' positions (halves rotated,
    as in GPT-NeoX and Llama)."""
    half = x.shape[-1] // 2
    freqs = base ** (-np.arange(half, dtype=np.float64) / half)
    angles = np.asarray(positions, dtype=np.float64)[:, None] * freqs[None, :]  # [tokens, half]
    cos = np.cos(angles)[:, None, :].astype(x.dtype)
    sin = np.sin(angles)[:, None, :].astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def silu(x):
    return x / (1 + np.exp(-x))


class ServedAttention:
    """Attention through attnd: one KV cache holds every layer of every sequence."""

    PAGE_SIZE = 16

    def __init__(self, client, cfg: Config, max_lengths, dtype="float32"):
        """max_lengths: the most tokens each sequence will hold. Each sequence fills whole pages of
        its own, so the capacity is counted per sequence, in pages."""
        self.client, self.dtype = client, dtype
        pages = sum(-(-n // self.PAGE_SIZE) for n in max_lengths)
        self.info = client.create_kv_cache(layers=cfg.layers, kv_heads=cfg.kv_heads, head_dim=cfg.head_dim,
                                           capacity_tokens=pages * self.PAGE_SIZE, dtype=dtype,
                                           page_size=self.PAGE_SIZE)
        self.cache = self.info.handle
        self.kernel_ns = 0
        self.calls = 0

    def _wire(self, x):
        if self.dtype == "bfloat16":
            from attn_client import to_bfloat16
            return to_bfloat16(x)
        return np.ascontiguousarray(x, dtype=self.dtype)

    def _result(self, r):
        self.kernel_ns += r.timings.kernel_ns
        self.calls += 1
        out = r.output
        return out.to_float32() if hasattr(out, "to_float32") else np.asarray(out, dtype=np.float32)

    def prefill(self, layer, ids, lens, q, k, v):
        return self._result(self.client.prefill(self.cache, layer, ids, lens, self._wire(q), self._wire(k),
                                                self._wire(v)))

    def decode(self, layer, ids, q, k, v):
        return self._result(self.client.decode(self.cache, layer, ids, self._wire(q), self._wire(k),
                                               self._wire(v)))

    def close(self):
        self.client.delete_kv_cache(self.cache)


class LocalAttention:
    """The same attention computed here, with each sequence's K/V kept in numpy (the reference)."""

    def __init__(self, cfg: Config, dtype=np.float64):
        self.cfg, self.dtype = cfg, dtype
        self.k = [dict() for _ in range(cfg.layers)]  # layer -> id -> [len, Hkv, D]
        self.v = [dict() for _ in range(cfg.layers)]

    def _attend(self, layer, sid, q, k_new, v_new):
        """Appends k_new/v_new [new, Hkv, D] and attends q [new, Hq, D] causally over the sequence."""
        ks, vs = self.k[layer], self.v[layer]
        ks[sid] = np.concatenate([ks[sid], k_new]) if sid in ks else k_new
        vs[sid] = np.concatenate([vs[sid], v_new]) if sid in vs else v_new
        k, v = ks[sid], vs[sid]
        group = q.shape[1] // k.shape[1]
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # [len, Hq, D]
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1])
        first = k.shape[0] - q.shape[0]  # position of the first new token
        visible = np.arange(k.shape[0])[None, :] <= first + np.arange(q.shape[0])[:, None]
        scores = np.where(visible[None], scores, -np.inf)
        p = np.exp(scores - scores.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        return np.einsum("hqk,khd->qhd", p, v)

    def prefill(self, layer, ids, lens, q, k, v):
        out, start = [], 0
        for sid, n in zip(ids, lens):
            out.append(self._attend(layer, sid, q[start:start + n], k[start:start + n], v[start:start + n]))
            start += n
        return np.concatenate(out)

    def decode(self, layer, ids, q, k, v):
        return np.stack([self._attend(layer, sid, q[i:i + 1], k[i:i + 1], v[i:i + 1])[0]
                         for i, sid in enumerate(ids)])


@dataclass
class Generation:
    tokens: list  # per sequence: the generated tokens
    logits: list = field(default_factory=list)  # per step (0 = after the prompts): [n, vocab]


class Model:
    def __init__(self, cfg: Config, weights: Weights, attention):
        self.cfg, self.w, self.attention = cfg, weights, attention

    def attention_inputs(self, layer, x, positions):
        """One layer's q [tokens, Hq, D], k and v [tokens, Hkv, D] of hidden states x at their
        positions (rotary embeddings applied to q and k)."""
        cfg, lw = self.cfg, self.w.layers[layer]
        h = rms_norm(x, lw["attn_norm"], cfg.norm_eps)
        q = (h @ lw["wq"]).reshape(-1, cfg.q_heads, cfg.head_dim)
        k = (h @ lw["wk"]).reshape(-1, cfg.kv_heads, cfg.head_dim)
        v = (h @ lw["wv"]).reshape(-1, cfg.kv_heads, cfg.head_dim)
        return rotary(q, positions, cfg.rope_base), rotary(k, positions, cfg.rope_base), v

    def after_attention(self, layer, x, o):
        """The hidden states after one layer, given its attention output o [tokens, Hq, D]: the
        output projection and the MLP, each with its residual."""
        cfg, lw = self.cfg, self.w.layers[layer]
        x = x + np.asarray(o, dtype=x.dtype).reshape(len(x), -1) @ lw["wo"]
        h = rms_norm(x, lw["mlp_norm"], cfg.norm_eps)
        return x + (silu(h @ lw["w_gate"]) * (h @ lw["w_up"])) @ lw["w_down"]

    def logits(self, x):
        return rms_norm(x, self.w.final_norm, self.cfg.norm_eps) @ self.w.unembed

    def _forward(self, tokens, positions, attend):
        """Logits [tokens, vocab] of a batch of tokens at their positions; `attend(layer, q, k, v)`
        runs attention over [tokens, heads, D] arrays."""
        x = self.w.embed[tokens]
        for layer in range(len(self.w.layers)):
            x = self.after_attention(layer, x, attend(layer, *self.attention_inputs(layer, x, positions)))
        return self.logits(x)

    def generate(self, prompts, steps, forced=None) -> Generation:
        """Greedy decoding of `steps` tokens after each prompt. `forced` (per sequence, the tokens to
        feed instead of this model's own picks) lets a reference follow another run's tokens."""
        ids = [f"seq{i}" for i in range(len(prompts))]
        lens = [len(p) for p in prompts]
        tokens = np.concatenate(prompts)
        positions = np.concatenate([np.arange(n) for n in lens])
        logits = self._forward(tokens, positions,
                               lambda layer, q, k, v: self.attention.prefill(layer, ids, lens, q, k, v))
        last = np.cumsum(lens) - 1
        out = Generation([[] for _ in prompts])
        step_logits = logits[last]
        for step in range(steps):
            out.logits.append(step_logits)
            picked = np.argmax(step_logits, axis=-1)
            for i in range(len(prompts)):
                out.tokens[i].append(int(forced[i][step] if forced is not None else picked[i]))
            if step == steps - 1:
                break
            fed = np.array([t[-1] for t in out.tokens])
            positions = np.array(lens) + step
            step_logits = self._forward(fed, positions,
                                        lambda layer, q, k, v: self.attention.decode(layer, ids, q, k, v))
        return out


def make_prompts(cfg: Config, lengths, seed: int):
    rng = np.random.default_rng(seed + 1)
    return [rng.integers(0, cfg.vocab, size=n) for n in lengths]


def compare(served: Generation, reference: Generation, tolerance: float):
    """Worst relative error of the served logits against the reference's, step by step, and the
    (sequence, step) pairs where the greedy tokens differ although the reference's top two logits
    are further apart than the tolerance allows (a near tie may go either way)."""
    worst, mismatches = 0.0, []
    for step, (got, want) in enumerate(zip(served.logits, reference.logits)):
        err = np.abs(got.astype(np.float64) - want) / np.abs(want).max(axis=-1, keepdims=True)
        worst = max(worst, float(err.max()))
        for i in range(len(got)):
            top2 = np.sort(want[i])[-2:]
            margin = (top2[1] - top2[0]) / np.abs(want[i]).max()
            if served.tokens[i][step] != int(np.argmax(want[i])) and margin > 2 * tolerance:
                mismatches.append((i, step, margin))
    return worst, mismatches


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", default="127.0.0.1:50051")
    parser.add_argument("--steps", type=int, default=64, help="tokens generated per prompt")
    parser.add_argument("--prompt-lengths", default="5,9,13,17,24,31,40,48",
                        help="comma-separated, one prompt per length")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="the cache's dtype (what travels)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--check", action="store_true",
                        help="also run the model in float64 here and compare the logits of every step")
    args = parser.parse_args(argv)

    from attn_client import Client

    cfg = Config()
    lengths = [int(n) for n in args.prompt_lengths.split(",")]
    weights = random_weights(cfg, args.seed)
    prompts = make_prompts(cfg, lengths, args.seed)
    with Client(args.server, timeout=60) as client:
        attention = ServedAttention(client, cfg, [n + args.steps for n in lengths], dtype=args.dtype)
        try:
            start = time.perf_counter()
            served = Model(cfg, weights.astype(np.float32), attention).generate(prompts, args.steps)
            seconds = time.perf_counter() - start
        finally:
            attention.close()
    print(f"cache {attention.cache} on {attention.info.replica} ({attention.info.device}), {args.dtype}")
    print(f"{len(prompts)} prompts of {lengths} tokens, {args.steps} tokens each: {seconds:.2f} s, "
          f"{len(prompts) * args.steps / seconds:.0f} tokens/s, {attention.calls} attention calls, "
          f"server kernel time {attention.kernel_ns / 1e6:.1f} ms")
    for i, t in enumerate(served.tokens):
        print(f"  seq{i}: {t[:16]}{' ...' if len(t) > 16 else ''}")
    if args.check:
        reference = Model(cfg, weights, LocalAttention(cfg)).generate(prompts, args.steps, forced=served.tokens)
        tolerance = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 1e-1}[args.dtype]
        worst, mismatches = compare(served, reference, tolerance)
        print(f"largest logit error over {args.steps} steps: {worst:.2e} of the row's largest logit"
              f" (tolerance {tolerance:g}); greedy tokens that differ: {len(mismatches)}")
        return 0 if worst <= tolerance and not mismatches else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
