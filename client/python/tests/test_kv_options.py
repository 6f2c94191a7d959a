"""Sliding windows, soft caps and attention sinks through attn_client against the real server
(CPU backend): Decode and Prefill (chunked, causal or not) and one-shot Attention against numpy in
float64, and their bad options refused naming the field with the cache left as it was."""

import grpc
import numpy as np
import pytest

from attn_client import AttnError, Client, Resident

D = 16


def rel_error(got, want):
    got = np.asarray(got, dtype=np.float64)
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300)


def attend(q, keys, values, *, causal=True, window_left=None, window_right=None, softcap=0.0, sinks=None):
    """float64 attention of q [n, Hq, D] (the last n of len positions) over keys/values [len, Hkv, D]:
    windows as FlashAttention-2 (bottom-right aligned), soft cap, and gpt-oss's sinks (an extra
    softmax column per head, dropped). Returns (o [n, Hq, D], lse [n, Hq])."""
    q, keys, values = (np.asarray(t, dtype=np.float64) for t in (q, keys, values))
    n, hq, d = q.shape
    length = keys.shape[0]
    group = hq // keys.shape[1]
    keys, values = np.repeat(keys, group, axis=1), np.repeat(values, group, axis=1)
    s = np.einsum("qhd,khd->hqk", q, keys) / np.sqrt(d)
    if softcap > 0:
        s = softcap * np.tanh(s / softcap)
    pos = (length - n + np.arange(n))[:, None]
    j = np.arange(length)[None, :]
    visible = np.ones((n, length), dtype=bool)
    if causal:
        visible &= j <= pos
    elif window_right is not None and window_right >= 0:
        visible &= j <= pos + window_right
    if window_left is not None and window_left >= 0:
        visible &= j >= pos - window_left
    s = np.where(visible[None], s, -np.inf)
    if sinks is not None:
        sink_col = np.broadcast_to(np.asarray(sinks, dtype=np.float64)[:, None, None], (hq, n, 1))
        s = np.concatenate([s, sink_col], axis=-1)
    m = s.max(axis=-1, keepdims=True)
    p = np.exp(s - m)
    denom = p.sum(axis=-1, keepdims=True)
    lse = (m + np.log(denom))[..., 0].T
    p = p / denom
    if sinks is not None:
        p = p[..., :-1]
    return np.einsum("hqk,khd->qhd", p, values), lse


class Mirror:
    """Each sequence's K/V in float64, as the server holds them."""

    def __init__(self):
        self.k, self.v = {}, {}

    def append(self, sid, k, v):
        self.k[sid] = np.concatenate([self.k[sid], k]) if sid in self.k else np.asarray(k, np.float64)
        self.v[sid] = np.concatenate([self.v[sid], v]) if sid in self.v else np.asarray(v, np.float64)


@pytest.mark.parametrize("hq,hkv", [(6, 2), (7, 1), (32, 1)])
def test_prefill_and_decode_with_windows_softcaps_and_sinks_match_float64(server, rng, hq, hkv):
    c = Client(server.address, timeout=60)
    cache = c.create_kv_cache(layers=1, kv_heads=hkv, head_dim=D, capacity_tokens=2048, page_size=16).handle
    ids, lens = ["a", "b", "c", "d"], [1, 7, 33, 1000]
    mirror = Mirror()

    def prefill(lens, **opts):
        total = sum(lens)
        q = (2 * rng.standard_normal((total, hq, D))).astype(np.float32)
        k = (2 * rng.standard_normal((total, hkv, D))).astype(np.float32)
        v = rng.standard_normal((total, hkv, D)).astype(np.float32)
        r = c.prefill(cache, 0, ids, lens, q, k, v, return_lse=True, **opts)
        assert r.timings.kernel == "paged_prefill/cpu"
        want_o, want_lse, start = [], [], 0
        for sid, n in zip(ids, lens):
            mirror.append(sid, k[start:start + n], v[start:start + n])
            o, lse = attend(q[start:start + n], mirror.k[sid], mirror.v[sid], causal=not opts.get("non_causal"),
                            window_left=opts.get("window_left"), window_right=opts.get("window_right"),
                            softcap=opts.get("softcap", 0.0), sinks=opts.get("sinks"))
            want_o.append(o)
            want_lse.append(lse)
            start += n
        assert rel_error(r.output, np.concatenate(want_o)) < 1e-5
        assert np.abs(r.lse - np.concatenate(want_lse)).max() < 1e-3
        assert not np.isnan(r.output).any()

    prefill(lens, window_left=5, softcap=2.0, sinks=rng.standard_normal(hq).astype(np.float32))
    prefill([7, 7, 7, 7], non_causal=True, window_left=33, window_right=3,
            sinks=(25 + rng.standard_normal(hq)).astype(np.float32))
    for step, (window, center) in enumerate([(0, None), (1, 0.0), (5, 25.0), (5000, -1e4), (None, 0.0)]):
        q = (2 * rng.standard_normal((4, hq, D))).astype(np.float32)
        k = (2 * rng.standard_normal((4, hkv, D))).astype(np.float32)
        v = rng.standard_normal((4, hkv, D)).astype(np.float32)
        sinks = None if center is None else (center + rng.standard_normal(hq)).astype(np.float32)
        softcap = 3.0 if step % 2 else 0.0
        r = c.decode(cache, 0, ids, q, k, v, return_lse=True, window_left=window, softcap=softcap, sinks=sinks)
        assert r.timings.kernel == "paged_decode/cpu"
        want_o, want_lse = [], []
        for i, sid in enumerate(ids):
            mirror.append(sid, k[i:i + 1], v[i:i + 1])
            o, lse = attend(q[i:i + 1], mirror.k[sid], mirror.v[sid], window_left=window, softcap=softcap,
                            sinks=sinks)
            want_o.append(o)
            want_lse.append(lse)
        assert rel_error(r.output, np.concatenate(want_o)) < 1e-5, (window, center)
        assert np.abs(r.lse - np.concatenate(want_lse)).max() < 1e-3, (window, center)
    c.delete_kv_cache(cache)


def test_bad_options_name_the_field_and_change_nothing(server, rng):
    c = Client(server.address, timeout=30)
    hq, hkv = 4, 2
    cache = c.create_kv_cache(layers=1, kv_heads=hkv, head_dim=D, capacity_tokens=256, page_size=16).handle
    q = rng.standard_normal((12, hq, D)).astype(np.float32)
    k = rng.standard_normal((12, hkv, D)).astype(np.float32)
    c.prefill(cache, 0, ["a", "b"], [5, 7], q, k, k)

    def state():
        info = c.describe_kv_cache(cache)
        info.ClearField("expires_unix_ms")
        kv = [c.read_kv(cache, sid, 0) for sid in ("a", "b")]
        return info.SerializeToString(), [(np.asarray(a).tobytes(), np.asarray(b).tobytes()) for a, b in kv]

    before = state()
    good = np.zeros(hq, np.float32)
    cases = [
        ("window_left", dict(window_left=-2)),
        ("softcap", dict(softcap=-1.0)),
        ("softcap", dict(softcap=float("nan"))),
        ("softcap", dict(softcap=float("inf"))),
        # The client sends arrays as float32: another dtype comes by resident handle.
        ("sinks.dtype", dict(sinks=Resident(c.put_tensor(good.astype(np.float16)).handle))),
        ("sinks.shape", dict(sinks=np.zeros(hq + 1, np.float32))),
        ("sinks[2]", dict(sinks=np.array([0, 0, np.nan, 0], np.float32))),
        ("sinks[0]", dict(sinks=np.array([-np.inf, 0, 0, 0], np.float32))),
    ]
    q1 = rng.standard_normal((2, hq, D)).astype(np.float32)
    k1 = rng.standard_normal((2, hkv, D)).astype(np.float32)
    for field, opts in cases:
        with pytest.raises(AttnError) as e:
            c.decode(cache, 0, ["a", "b"], q1, k1, k1, **opts)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.message, (field, e.value)
        with pytest.raises(AttnError) as e:
            c.prefill(cache, 0, ["a", "b"], [1, 1], q1, k1, k1, **opts)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.message, (field, e.value)
        assert state() == before, field
    with pytest.raises(AttnError) as e:
        c.prefill(cache, 0, ["a", "b"], [1, 1], q1, k1, k1, window_right=-3)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "window_right" in e.value.message
    assert state() == before
    c.delete_kv_cache(cache)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (2, 6, 2, 7, 33), (1, 7, 1, 33, 7), (1, 3, 1, 1, 1000)])
def test_attention_with_sinks_matches_float64(server, rng, shape):
    c = Client(server.address, timeout=30)
    b, hq, hkv, sq, sk = shape
    for causal, window_left, softcap, center in [(False, None, 0.0, 0.0), (True, None, 0.0, 20.0),
                                                 (True, 3, 2.0, 0.0), (False, 2, 0.0, -1e4)]:
        q = (2 * rng.standard_normal((b, hq, sq, D))).astype(np.float32)
        k = (2 * rng.standard_normal((b, hkv, sk, D))).astype(np.float32)
        v = rng.standard_normal((b, hkv, sk, D)).astype(np.float32)
        sinks = (center + rng.standard_normal(hq)).astype(np.float32)
        r = c.attention(q, k, v, causal=causal, window_left=window_left, softcap=softcap, sinks=sinks,
                        return_lse=True)
        for bi in range(b):
            # attend() takes [n, H, D] rows: the batch's queries as the last sq of sk positions.
            o, lse = attend(q[bi].transpose(1, 0, 2), k[bi].transpose(1, 0, 2), v[bi].transpose(1, 0, 2),
                            causal=causal, window_left=window_left, softcap=softcap, sinks=sinks)
            got = np.asarray(r.output[bi], np.float64).transpose(1, 0, 2)
            if sq > sk:  # queries before the first key: zeros, lse = the sink
                assert np.all(got[: sq - sk] == 0) if causal else True
            assert rel_error(got, o) < 1e-5, (shape, causal, window_left, softcap, center)
            assert np.abs(r.lse[bi].T - lse).max() < 1e-3


def test_attention_refuses_bad_sinks(server, rng):
    c = Client(server.address, timeout=30)
    q = rng.standard_normal((1, 4, 5, D)).astype(np.float32)
    half = Resident(c.put_tensor(np.zeros(4, np.float16)).handle)
    for field, sinks in [("sinks.dtype", half), ("sinks.shape", np.zeros(3, np.float32)),
                         ("sinks[1]", np.array([0, np.nan, 0, 0], np.float32))]:
        with pytest.raises(AttnError) as e:
            c.attention(q, q, q, sinks=sinks)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.message, (field, e.value)
