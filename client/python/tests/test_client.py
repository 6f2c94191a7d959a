"""attn_client against the real server, results checked against numpy in float64."""

import os
import urllib.request

import numpy as np
import pytest

from attn_client import AttnError, BFloat16, Client, Resident, to_bfloat16
from conftest import Server


def rel_error(got, want):
    got = np.asarray(got, dtype=np.float64)
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300)


def softmax64(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def attention64(q, k, v, causal, scale, window_left=-1, window_right=-1, softcap=0.0):
    q, k, v = (np.asarray(t, dtype=np.float64) for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = scale * q @ k.transpose(0, 1, 3, 2)
    if softcap > 0:
        s = softcap * np.tanh(s / softcap)
    sq, sk = q.shape[2], k.shape[2]
    # bottom-right aligned: query i sits at key position i + (sk - sq)
    pos, j = np.arange(sq)[:, None] + (sk - sq), np.arange(sk)[None, :]
    visible = np.ones((sq, sk), dtype=bool)
    if causal:
        visible &= j <= pos
    elif window_right >= 0:
        visible &= j <= pos + window_right
    if window_left >= 0:
        visible &= j >= pos - window_left
    s = np.where(visible, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    seen = np.isfinite(m)  # a row that sees no key: zeros, lse -inf
    p = np.exp(s - np.where(seen, m, 0.0))
    total = p.sum(axis=-1, keepdims=True)
    lse = np.where(seen, m + np.log(np.where(seen, total, 1.0)), -np.inf)[..., 0]
    return (p / np.where(seen, total, 1.0)) @ v, lse


def test_softmax_float32_and_float16(server, rng):
    c = Client(server.address, timeout=30)
    x = rng.standard_normal((7, 1000)).astype(np.float32)
    r = c.softmax(x)
    assert r.output.dtype == np.float32 and r.output.shape == (7, 1000)
    assert rel_error(r.output, softmax64(x)) < 1e-5
    assert r.timings.kernel.startswith("softmax/") and r.timings.device.startswith("cpu")
    assert r.timings.total_ns >= r.timings.kernel_ns > 0
    h = c.softmax(x.astype(np.float16))
    assert h.output.dtype == np.float16
    assert rel_error(h.output, softmax64(x.astype(np.float16))) < 1e-2


def test_matmul_transposed_batched_and_bfloat16(server, rng):
    c = Client(server.address, timeout=30)
    a = rng.standard_normal((33, 17)).astype(np.float32)  # stored [K, M], read transposed
    b = rng.standard_normal((33, 5)).astype(np.float32)
    r = c.matmul(a, b, transpose_a=True)
    assert rel_error(r.output, a.T.astype(np.float64) @ b) < 1e-5
    a3 = rng.standard_normal((3, 7, 9)).astype(np.float32)
    b3 = rng.standard_normal((3, 9, 4)).astype(np.float32)
    assert rel_error(c.matmul(a3, b3).output, a3.astype(np.float64) @ b3) < 1e-5
    ab, bb = to_bfloat16(a3), to_bfloat16(b3)
    rb = c.matmul(ab, bb)
    assert isinstance(rb.output, BFloat16) and rb.output.shape == (3, 7, 4)
    want = ab.to_float32().astype(np.float64) @ bb.to_float32()
    assert rel_error(rb.output.to_float32(), want) < 1e-2


@pytest.mark.parametrize("causal", [False, True])
def test_attention_gqa_with_lse(server, rng, causal):
    c = Client(server.address, timeout=30)
    q = rng.standard_normal((2, 4, 7, 64)).astype(np.float32)
    k = rng.standard_normal((2, 2, 33, 64)).astype(np.float32)
    v = rng.standard_normal((2, 2, 33, 64)).astype(np.float32)
    r = c.attention(q, k, v, causal=causal, return_lse=True)
    want, lse = attention64(q, k, v, causal, 1 / 8)
    assert r.output.shape == (2, 4, 7, 64)
    assert rel_error(r.output, want) < 1e-5
    assert rel_error(r.lse, lse) < 1e-5
    assert r.timings.flops > 0


@pytest.mark.parametrize("causal,window_left,window_right,softcap",
                         [(False, 5, 3, 0.0), (True, 10, None, 0.0), (False, None, 0, 5.0), (True, 0, None, 2.0)])
def test_attention_sliding_window_and_softcap(server, rng, causal, window_left, window_right, softcap):
    c = Client(server.address, timeout=30)
    q = (3 * rng.standard_normal((1, 4, 33, 64))).astype(np.float32)  # large logits: the cap matters
    k = (3 * rng.standard_normal((1, 2, 40, 64))).astype(np.float32)
    v = rng.standard_normal((1, 2, 40, 64)).astype(np.float32)
    r = c.attention(q, k, v, causal=causal, return_lse=True, window_left=window_left,
                    window_right=window_right, softcap=softcap)
    want, lse = attention64(q, k, v, causal, 1 / 8, -1 if window_left is None else window_left,
                            -1 if window_right is None else window_right, softcap)
    plain, _ = attention64(q, k, v, causal, 1 / 8)
    assert rel_error(want, plain) > 1e-2  # the options change the answer
    assert rel_error(r.output, want) < 1e-5
    assert rel_error(r.lse, lse) < 1e-5


@pytest.mark.parametrize("field,kwargs", [("window_left", {"window_left": -2}),
                                          ("window_right", {"window_right": -5}),
                                          ("softcap", {"softcap": -1.0}),
                                          ("softcap", {"softcap": float("nan")}),
                                          ("softcap", {"softcap": float("inf")})])
def test_attention_bad_options_name_the_field(server, rng, field, kwargs):
    c = Client(server.address, timeout=30)
    q = rng.standard_normal((1, 1, 7, 32)).astype(np.float32)
    with pytest.raises(AttnError) as e:
        c.attention(q, q, q, **kwargs)
    assert e.value.code.name == "INVALID_ARGUMENT"
    assert e.value.message.startswith(field + ":")


def test_bad_input_raises_with_the_field_named(server, rng):
    c = Client(server.address, timeout=30)
    a = rng.standard_normal((3, 4)).astype(np.float32)
    with pytest.raises(AttnError) as e:
        c.matmul(a, a)
    assert e.value.code.name == "INVALID_ARGUMENT"
    assert "b.shape" in e.value.message or "a.shape" in e.value.message
    with pytest.raises(TypeError):
        c.softmax(np.arange(4))  # int64: not a dtype the service takes


def test_server_info_kernels_and_health(server):
    c = Client(server.address, timeout=30)
    info = c.server_info()
    assert info.backend == "cpu" and info.version
    names = [k.name for k in c.list_kernels("softmax")]
    assert "softmax/cpu" in names
    assert c.health() == "SERVING"


def test_bfloat16_rounds_to_nearest_even():
    x = np.array([1.0, 1.00390625, 1.01171875, -2.5, np.inf, np.nan], dtype=np.float32)
    b = to_bfloat16(x)
    # 1 + 2^-8 is a tie: rounds to even (1.0); 1 + 3*2^-8 rounds up to 1 + 2^-6.
    np.testing.assert_array_equal(b.to_float32()[:5], [1.0, 1.0, 1.015625, -2.5, np.inf])
    assert np.isnan(b.to_float32()[5])


def test_token_is_sent_and_required():
    s = Server(env={"ATTND_TOKEN": "py-secret"})
    try:
        x = np.zeros((1, 2), dtype=np.float32)
        with pytest.raises(AttnError) as e:
            Client(s.address, timeout=10, token="").softmax(x)
        assert e.value.code.name == "UNAUTHENTICATED"
        r = Client(s.address, timeout=10, token="py-secret").softmax(x)
        np.testing.assert_allclose(r.output, [[0.5, 0.5]])
    finally:
        assert s.stop() == 0


def test_requests_declare_their_size():
    """The client declares each request's size (attn-request-bytes), so that the server's memory bound
    can refuse a call before its bytes come; the server counts declared calls in its metrics."""
    s = Server("--metrics-listen", "127.0.0.1:0")
    try:
        metrics_port = int(open(os.path.join(s.dir, "port")).read().split()[1])
        c = Client(s.address, timeout=10)
        c.softmax(np.zeros((3, 5), dtype=np.float32))
        c.list_kernels()
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        declared = [line for line in text.splitlines() if line.startswith("attnd_request_size_declared_total{")]
        assert any('op="softmax"' in line and 'declared="yes"' in line and line.endswith(" 1") for line in declared), text
        assert not any('declared="no"' in line for line in declared), declared
    finally:
        assert s.stop() == 0


def test_resident_tensors_chain_and_lifecycle(server, rng):
    c = Client(server.address, timeout=30)
    a = rng.standard_normal((33, 70)).astype(np.float32)
    b = rng.standard_normal((70, 17)).astype(np.float32)
    inline = c.softmax(c.matmul(a, b).output).output
    ha, hb = c.put_tensor(a, chunk_bytes=1000), c.put_tensor(b)
    assert ha.bytes == a.nbytes and ha.handle.startswith("t-")
    np.testing.assert_array_equal(c.get_tensor(ha.handle, chunk_bytes=999), a)
    kept = c.matmul(Client.resident(ha.handle), Client.resident(hb.handle), keep_output=True).output
    assert isinstance(kept, Resident)
    chained = c.softmax(kept).output
    np.testing.assert_array_equal(chained, inline)
    assert {t.handle for t in c.list_tensors().tensors} == {ha.handle, hb.handle, kept.handle}
    for h in (ha.handle, hb.handle, kept.handle):
        assert c.delete_tensor(h) > 0
    with pytest.raises(AttnError) as e:
        c.get_tensor(ha.handle)
    assert e.value.code.name == "NOT_FOUND"
    assert c.list_tensors().used_bytes == 0


def test_benchmark_and_echo(server):
    c = Client(server.address, timeout=60)
    results = c.benchmark("softmax", [8, 1000], dtype="float16", iterations=3)
    assert [r.kernel for r in results] == ["softmax/cpu"]
    assert results[0].correct and results[0].median_ns > 0
    assert c.echo(b"abc").payload == b"abc"
