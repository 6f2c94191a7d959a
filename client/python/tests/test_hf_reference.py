"""test_hf.py's tests with a numpy stand-in for attnd (ReferenceClient): the transformers side of
attn_client.hf (registration, masks, AttnCache bookkeeping, tensor layouts) checked on its own,
with no server. Skips without torch or transformers."""

from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from attn_client import BFloat16, KvResult, Result, to_bfloat16  # noqa: E402
from attn_client.hf import register  # noqa: E402
from test_hf import *  # noqa: E402,F401,F403 (the tests, collected here again with the client below)
from test_hf import NAME  # noqa: E402


def _f64(a):
    return (a.to_float32() if isinstance(a, BFloat16) else np.asarray(a)).astype(np.float64)


def _like(x, template):
    if isinstance(template, BFloat16):
        return to_bfloat16(x.astype(np.float32))
    return x.astype(np.asarray(template).dtype)


def _attend(q, k, v, positions, scale, window_left, softcap, sinks):
    """q [n, Hq, D] at key positions `positions` over k/v [L, Hkv, D], causal (+ window)."""
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    scale = scale or d ** -0.5
    rep = hq // hkv
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = np.einsum("nhd,lhd->nhl", q, k) * scale
    if softcap:
        s = softcap * np.tanh(s / softcap)
    kv_pos = np.arange(k.shape[0])
    allowed = kv_pos[None, :] <= positions[:, None]
    if window_left is not None and window_left >= 0:
        allowed &= kv_pos[None, :] >= positions[:, None] - window_left
    s = np.where(allowed[:, None, :], s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    if sinks is not None:
        m = np.maximum(m, np.asarray(sinks, np.float64)[None, :, None])
    p = np.exp(s - m)
    denom = p.sum(axis=-1, keepdims=True)
    if sinks is not None:
        denom = denom + np.exp(np.asarray(sinks, np.float64)[None, :, None] - m)
    return np.einsum("nhl,lhd->nhd", p / denom, v)


class ReferenceClient:
    """What attn_client.hf calls of Client, computed in numpy (float64) from the documented semantics."""

    def __init__(self):
        self.caches, self.n = {}, 0

    def create_kv_cache(self, *, layers, kv_heads, head_dim, capacity_tokens, dtype="float32", page_size=0,
                        ttl_ms=0, device="", kv_storage=""):
        assert not kv_storage, "the stand-in keeps K/V in float64: no float8 storage"
        self.n += 1
        handle = f"ref{self.n}"
        self.caches[handle] = SimpleNamespace(config=SimpleNamespace(layers=layers, kv_heads=kv_heads,
                                                                     head_dim=head_dim), seqs={})
        return SimpleNamespace(handle=handle)

    def delete_kv_cache(self, handle):
        del self.caches[handle]
        return 0

    def describe_kv_cache(self, handle):
        c = self.caches[handle]
        return SimpleNamespace(handle=handle, config=c.config, sequences=[SimpleNamespace(id=i) for i in c.seqs])

    def list_kv_caches(self, replica=""):
        return SimpleNamespace(caches=[SimpleNamespace(handle=h) for h in self.caches])

    def release_sequences(self, cache, ids):
        for i in ids:
            self.caches[cache].seqs.pop(i, None)
        return 0

    def truncate_sequence(self, cache, sid, length):
        for layer in self.caches[cache].seqs[sid]:
            layer[0], layer[1] = layer[0][:length], layer[1][:length]

    def _run(self, cache, layer, ids, lens, q, k, v, scale, window_left, softcap, sinks, expected_lengths):
        c = self.caches[cache]
        if expected_lengths is not None:  # the server refuses a call that expects other lengths
            have = [c.seqs[sid][layer][0].shape[0] if sid in c.seqs else 0 for sid in ids]
            assert have == list(expected_lengths), f"expected_lengths {list(expected_lengths)}, cache has {have}"
        qf, kf, vf = _f64(q), _f64(k), _f64(v)
        out, lengths, at = [], [], 0
        for sid, n in zip(ids, lens):
            if sid not in c.seqs:
                shape = (0, c.config.kv_heads, c.config.head_dim)
                c.seqs[sid] = [[np.zeros(shape), np.zeros(shape)] for _ in range(c.config.layers)]
            kv = c.seqs[sid][layer]
            old = kv[0].shape[0]
            kv[0] = np.concatenate([kv[0], kf[at:at + n]])
            kv[1] = np.concatenate([kv[1], vf[at:at + n]])
            out.append(_attend(qf[at:at + n], kv[0], kv[1], old + np.arange(n), scale, window_left, softcap,
                               None if sinks is None else _f64(sinks)))
            lengths.append(kv[0].shape[0])
            at += n
        return KvResult(_like(np.concatenate(out), q), lengths, None)

    def prefill(self, cache, layer, sequence_ids, lens, q, k, v, *, non_causal=False, scale=0.0, return_lse=False,
                kernel="", window_left=None, window_right=None, softcap=0.0, sinks=None, expected_lengths=None):
        return self._run(cache, layer, list(sequence_ids), list(lens), q, k, v, scale, window_left, softcap, sinks,
                         expected_lengths)

    def decode(self, cache, layer, sequence_ids, q, k_new, v_new, *, scale=0.0, return_lse=False, kernel="",
               window_left=None, softcap=0.0, sinks=None, expected_lengths=None):
        ids = list(sequence_ids)
        return self._run(cache, layer, ids, [1] * len(ids), q, k_new, v_new, scale, window_left, softcap, sinks,
                         expected_lengths)

    def attention(self, q, k, v, *, causal=False, scale=0.0, window_left=None, window_right=None, softcap=0.0,
                  sinks=None, **unused):
        qf, kf, vf = _f64(q), _f64(k), _f64(v)
        b, _, sq, _ = qf.shape
        sk = kf.shape[2]
        out = np.stack([_attend(qf[i].transpose(1, 0, 2), kf[i].transpose(1, 0, 2), vf[i].transpose(1, 0, 2),
                                np.arange(sq) + sk - sq, scale, window_left, softcap,
                                None if sinks is None else _f64(sinks)).transpose(1, 0, 2) for i in range(b)])
        return Result(_like(out, q), None)


@pytest.mark.skip(reason="float8 storage and its sizes are the server's: the stand-in keeps K/V in float64")
def test_float8_cache_generates_near_a_bfloat16_cache():
    pass


@pytest.fixture(scope="module")
def reference_client():
    return ReferenceClient()


@pytest.fixture
def client(reference_client):
    register(reference_client, NAME)
    return reference_client
